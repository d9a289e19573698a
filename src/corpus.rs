//! The project's own corpus: a seeded generator of the text the tiny trained Ouro
//! (`fixtures/ouro-tiny-trained`, trained by `examples/train_tiny`) learns, in the spirit of the Ouro paper's
//! synthetic studies: facts to store and recall (made-up biographies), facts to manipulate
//! (two-hop questions over them, comparisons, chains of small sums), and templated prose.
//!
//! Every line is one sample and says by its opening words what kind it is (see [`Kind`]), so that
//! an evaluation can score the answers of recall and of manipulation lines separately.

/// xorshift64*: deterministic and independent of any crate's version.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    pub fn pick<'a, T>(&mut self, xs: &'a [T]) -> &'a T {
        &xs[self.below(xs.len())]
    }
}

const ONSETS: [&str; 16] = ["b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "sh", "th"];
const VOWELS: [&str; 6] = ["a", "e", "i", "o", "u", "ai"];

fn word(rng: &mut Rng, syllables: usize) -> String {
    let mut w = String::new();
    for _ in 0..syllables {
        w.push_str(*rng.pick(&ONSETS));
        w.push_str(*rng.pick(&VOWELS));
    }
    let mut c = w.chars();
    match c.next() {
        Some(f) => f.to_uppercase().collect::<String>() + c.as_str(),
        None => w,
    }
}

/// The world the text talks about.
pub struct World {
    pub people: Vec<Person>,
    pub cities: Vec<String>,
    pub firms: Vec<(String, usize)>, // name, city index
}

pub struct Person {
    pub name: String,
    pub city: usize,
    pub year: u32,
    pub firm: usize,
}

impl World {
    pub fn new(seed: u64, n_people: usize) -> World {
        let mut rng = Rng::new(seed);
        let mut unique = std::collections::BTreeSet::new();
        let mut fresh = |rng: &mut Rng, syl: usize| loop {
            let w = word(rng, syl);
            if unique.insert(w.clone()) {
                return w;
            }
        };
        let cities: Vec<String> = (0..12).map(|_| fresh(&mut rng, 3)).collect();
        let firms: Vec<(String, usize)> = (0..10)
            .map(|_| (format!("{} Works", fresh(&mut rng, 2)), rng.below(12)))
            .collect();
        let people = (0..n_people)
            .map(|_| Person {
                name: format!("{} {}", fresh(&mut rng, 2), fresh(&mut rng, 2)),
                city: rng.below(cities.len()),
                year: 1900 + rng.below(100) as u32,
                firm: rng.below(firms.len()),
            })
            .collect();
        World { people, cities, firms }
    }
}

/// What a line asks for: its answer is stored (recall) or must be computed (manipulation).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Biography statements and prose: no question.
    Statement,
    Recall,
    Manipulation,
}

/// The kind of a line, from its opening words, and the byte offset where its answer starts.
pub fn classify(line: &str) -> (Kind, Option<usize>) {
    let answer = line.rfind(" A: ").map(|i| i + 4).or_else(|| line.rfind(" = ").map(|i| i + 3));
    let kind = if line.starts_with("Q: Where was ") || line.starts_with("Q: When was ") || line.starts_with("Q: Who employs ") {
        Kind::Recall
    } else if line.starts_with("Q: In which city is the employer of ")
        || line.starts_with("Q: Who is older, ")
        || line.starts_with("Q: Which is larger, ")
        || line.starts_with("Sum: ")
    {
        Kind::Manipulation
    } else {
        Kind::Statement
    };
    (kind, if kind == Kind::Statement { None } else { answer })
}

/// One line of text.
pub fn line(w: &World, rng: &mut Rng) -> String {
    let p = rng.pick(&w.people);
    let city = &w.cities[p.city];
    let (firm, firm_city) = (&w.firms[p.firm].0, &w.cities[w.firms[p.firm].1]);
    match rng.below(12) {
        0 | 1 => format!("{} was born in {} in {}. {} works for {}.", p.name, city, p.year, p.name, firm),
        2 => format!("{firm} is based in {firm_city}."),
        3 => format!("Q: Where was {} born? A: {city}.", p.name),
        4 => format!("Q: When was {} born? A: {}.", p.name, p.year),
        5 => format!("Q: Who employs {}? A: {firm}.", p.name),
        6 => format!("Q: In which city is the employer of {}? A: {firm_city}.", p.name),
        7 => {
            let q = rng.pick(&w.people);
            if q.year == p.year {
                return line(w, rng);
            }
            let older = if p.year < q.year { &p.name } else { &q.name };
            format!("Q: Who is older, {} or {}? A: {older}.", p.name, q.name)
        }
        8 => {
            let (a, b) = (10 + rng.below(90), 10 + rng.below(90));
            if a == b {
                return line(w, rng);
            }
            format!("Q: Which is larger, {a} or {b}? A: {}.", a.max(b))
        }
        9 | 10 => {
            // a chain of small sums: each step must be carried
            let n = 2 + rng.below(3);
            let mut total = rng.below(10);
            let mut s = format!("Sum: {total}");
            for _ in 0..n {
                let x = 1 + rng.below(9);
                total += x;
                s.push_str(&format!(" + {x}"));
            }
            format!("{s} = {total}.")
        }
        _ => {
            let adj = ["quiet", "busy", "old", "green", "cold", "bright"];
            let thing = ["river", "market", "harbour", "library", "bridge", "garden"];
            format!("The {} in {} is {}.", rng.pick(&thing), city, rng.pick(&adj))
        }
    }
}

/// `n` lines from `seed`.
pub fn lines(w: &World, seed: u64, n: usize) -> Vec<String> {
    let mut rng = Rng::new(seed);
    (0..n).map(|_| line(w, &mut rng)).collect()
}

/// Question items for answer-level validation (`validate --tasks`): the question and sum lines
/// of the corpus drawn from `seed`, cut before their answer, without repeats, `per_kind` of each
/// kind (`recall`: where/when/who employs; `two-hop`: the city of a person's employer;
/// `comparison`: older, larger; `sum`: chains of 2 to 4 additions), as (prompt, answer, kind).
pub fn task_items(w: &World, seed: u64, per_kind: usize) -> Vec<(String, String, &'static str)> {
    let mut rng = Rng::new(seed);
    let mut seen = std::collections::BTreeSet::new();
    let mut count = std::collections::BTreeMap::new();
    let mut out = vec![];
    for _ in 0..1_000_000 {
        if out.len() == 4 * per_kind {
            break;
        }
        let l = line(w, &mut rng);
        let kind = if l.starts_with("Q: In which city is the employer of ") {
            "two-hop"
        } else if l.starts_with("Q: Who is older, ") || l.starts_with("Q: Which is larger, ") {
            "comparison"
        } else if l.starts_with("Sum: ") {
            "sum"
        } else if l.starts_with("Q: ") {
            "recall"
        } else {
            continue;
        };
        let Some(at) = classify(&l).1 else { continue };
        let n = count.entry(kind).or_insert(0usize);
        if *n < per_kind && seen.insert(l.clone()) {
            *n += 1;
            out.push((l[..at].trim_end().to_string(), l[at..].to_string(), kind));
        }
    }
    out
}

/// For each token of `text` (given by its byte span `(start, end)`), the kind of the line it lies in
/// and whether it lies in that line's answer (after ` A: ` or ` = `).
pub fn token_kinds(text: &str, spans: &[(usize, usize)]) -> Vec<(Kind, bool)> {
    // line start offsets and their classification
    let mut lines = vec![];
    let mut at = 0usize;
    for l in text.split_inclusive('\n') {
        let body = l.trim_end_matches('\n');
        let (kind, answer) = classify(body);
        lines.push((at, at + body.len(), kind, answer.map(|a| at + a)));
        at += l.len();
    }
    spans
        .iter()
        .map(|&(s, e)| {
            // the token's first non-space byte decides (byte-level BPE tokens carry the space before a word)
            let s = s + text[s..e.max(s)].len() - text[s..e.max(s)].trim_start().len();
            match lines.iter().find(|(a, b, _, _)| s >= *a && s < (*b).max(*a + 1)) {
                Some(&(_, _, kind, answer)) => (kind, answer.is_some_and(|a| s >= a)),
                None => (Kind::Statement, false),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_say_their_kind_and_answer() {
        assert_eq!(classify("Q: Where was Ba Ko born? A: Lima."), (Kind::Recall, Some(28)));
        assert_eq!(classify("Sum: 3 + 4 = 7."), (Kind::Manipulation, Some(13)));
        assert_eq!(classify("Q: Who is older, A B or C D? A: A B."), (Kind::Manipulation, Some(32)));
        assert_eq!(classify("The river in Lima is cold."), (Kind::Statement, None));
        let text = "Sum: 3 + 4 = 7.\nQ: When was X born? A: 1950.\n";
        let kinds = token_kinds(text, &[(0, 3), (12, 14), (22, 23), (40, 45)]);
        assert_eq!(kinds, vec![(Kind::Manipulation, false), (Kind::Manipulation, true), (Kind::Recall, false), (Kind::Recall, true)]);
    }

    #[test]
    fn the_generator_is_deterministic_and_every_kind_occurs() {
        let w = World::new(7, 10);
        let a = lines(&w, 3, 200);
        assert_eq!(a, lines(&World::new(7, 10), 3, 200));
        for k in [Kind::Statement, Kind::Recall, Kind::Manipulation] {
            assert!(a.iter().filter(|l| classify(l).0 == k).count() > 20, "{k:?}");
        }
        // answers are right: sums add up
        for l in a.iter().filter(|l| l.starts_with("Sum: ")) {
            let (lhs, rhs) = l.trim_end_matches('.').trim_start_matches("Sum: ").split_once(" = ").unwrap();
            let s: usize = lhs.split(" + ").map(|x| x.parse::<usize>().unwrap()).sum();
            assert_eq!(s, rhs.parse::<usize>().unwrap(), "{l}");
        }
    }
}
