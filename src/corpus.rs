//! The project's own corpus: a seeded generator of the text the tiny trained Ouro
//! (`fixtures/ouro-tiny-trained`, trained by `examples/train_tiny`) learns, in the spirit of the Ouro paper's
//! synthetic studies: facts to store and recall (made-up biographies), facts to manipulate
//! (two-hop questions over them, comparisons, chains of small sums), and templated prose.
//!
//! Every line is one sample and says by its opening words what kind it is (see [`Kind`]), so that
//! an evaluation can score the answers of recall and of manipulation lines separately.
//!
//! The second trained fixture (`fixtures/ouro-deep-trained`) adds walks ([`chain_line`]): four
//! moves, each a fixed permutation of twenty places, and questions that make 1 to
//! [`CHAIN_MAX_STEPS`] of them from a start place. Each move depends on where the previous one
//! led, so one pass of the stack cannot make many and more loops can: the item's move count is its
//! difficulty ([`chain_steps`]), by which an evaluation reports how deep the exit gate lets each
//! item go. (Until December 2026 these items were pointer chains, links given in the line and
//! followed by look-ups; no model of this size learned the look-up: docs/training.md.)

/// xorshift64*: deterministic and independent of any crate's version.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    /// The whole state, to save (a trainer's checkpoint) and restore with [`Rng::from_state`].
    pub fn state(&self) -> u64 {
        self.0
    }
    pub fn from_state(state: u64) -> Self {
        Rng(state)
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
        || line.starts_with(CHAIN_OPENING)
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

/// How a walk line opens.
pub const CHAIN_OPENING: &str = "Walk: ";
/// The places a walk moves between, named by the numbers 10 to `10 + WALK_PLACES - 1`.
pub const WALK_PLACES: usize = 20;
/// The moves, each a fixed permutation of the places ([`walk_moves`]).
pub const WALK_MOVES: [&str; 4] = ["A", "B", "C", "D"];
/// The most moves a walk question asks for: four, one for each loop. (The first recipe asked for
/// up to eight; a loop of two layers makes about one move, so five and more stayed a guess at
/// every loop and only filled the batches: docs/training.md.)
pub const CHAIN_MAX_STEPS: usize = 4;
/// Questions asked in each walk line (each its own start and moves, all the same number of moves).
pub const CHAIN_QUESTIONS: usize = 3;

/// What each move does: `walk_moves()[m][p]` is the place move `m` leads to from place `p`
/// (0-based). Fixed for the whole corpus (drawn once from a constant seed), so the model stores the
/// moves in its weights and each question only says where to start and which moves to make.
/// Four random permutations of 20 places: no two commute, so the order of the moves matters and
/// no count of them gives the answer. Drawn on first use, once.
pub fn walk_moves() -> &'static [Vec<usize>] {
    static MOVES: std::sync::OnceLock<Vec<Vec<usize>>> = std::sync::OnceLock::new();
    MOVES.get_or_init(|| {
        let mut rng = Rng::new(0x0a1c_5eed);
        WALK_MOVES
            .iter()
            .map(|_| {
                let mut p: Vec<usize> = (0..WALK_PLACES).collect();
                for i in (1..WALK_PLACES).rev() {
                    p.swap(i, rng.below(i + 1));
                }
                p
            })
            .collect()
    })
}

/// A walk item that asks for `steps` moves (1 to [`CHAIN_MAX_STEPS`]): [`CHAIN_QUESTIONS`]
/// questions, each a start place, `steps` moves drawn at random and the place they lead to after
/// ` = `:
/// `Walk: 3 moves. 17 A C B = 23. 25 D A A = 11. 12 B B C = 28.`
/// The place after each move depends on the place before it, so the answer needs `steps` moves
/// in sequence: one pass of the stack can make a few (the model learns the four moves and pairs
/// of them), more loops can make more. The step count, written after the opening, is the item's
/// difficulty ([`chain_steps`]).
pub fn chain_line(rng: &mut Rng, steps: usize) -> String {
    assert!((1..=CHAIN_MAX_STEPS).contains(&steps), "steps {steps} outside 1..={CHAIN_MAX_STEPS}");
    let moves = walk_moves();
    let unit = if steps == 1 { "move" } else { "moves" };
    let mut s = format!("{CHAIN_OPENING}{steps} {unit}.");
    for _ in 0..CHAIN_QUESTIONS {
        let mut at = rng.below(WALK_PLACES);
        s.push_str(&format!(" {}", 10 + at));
        for _ in 0..steps {
            let m = rng.below(WALK_MOVES.len());
            s.push_str(&format!(" {}", WALK_MOVES[m]));
            at = moves[m][at];
        }
        s.push_str(&format!(" = {}.", 10 + at));
    }
    s
}

/// The number of moves a walk line asks for (its difficulty); `None` for other lines.
pub fn chain_steps(line: &str) -> Option<usize> {
    line.strip_prefix(CHAIN_OPENING)?.split(' ').next()?.parse().ok()
}

/// A line of the second fixture's text: a walk (moves drawn uniformly from 1 to
/// [`CHAIN_MAX_STEPS`]) with probability `chain_share` / 100, else a line of [`line`].
pub fn mixed_line(w: &World, rng: &mut Rng, chain_share: usize) -> String {
    if rng.below(100) < chain_share {
        let steps = 1 + rng.below(CHAIN_MAX_STEPS);
        chain_line(rng, steps)
    } else {
        line(w, rng)
    }
}

/// `n` lines of [`mixed_line`] from `seed`.
pub fn mixed_lines(w: &World, seed: u64, n: usize, chain_share: usize) -> Vec<String> {
    let mut rng = Rng::new(seed);
    (0..n).map(|_| mixed_line(w, &mut rng, chain_share)).collect()
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

/// The byte spans of a line's answers: a walk's after each ` = ` up to its `.`, any other
/// question's from [`classify`]'s offset to the end of the line; none for statements.
pub fn answer_spans(line: &str) -> Vec<(usize, usize)> {
    if line.starts_with(CHAIN_OPENING) {
        return line
            .match_indices(" = ")
            .map(|(i, _)| (i + 3, line[i + 3..].find('.').map_or(line.len(), |e| i + 3 + e)))
            .collect();
    }
    classify(line).1.map(|a| vec![(a, line.len())]).unwrap_or_default()
}

/// Walk items for answer-level validation: `per_steps` for each step count from 1 to
/// [`CHAIN_MAX_STEPS`], drawn from `seed`, as (prompt, answer, steps): the prompt is the line cut
/// just before its first answer (`Walk: 3 moves. 17 A C B =`), the answer the number that follows.
pub fn chain_task_items(seed: u64, per_steps: usize) -> Vec<(String, usize, usize)> {
    let mut rng = Rng::new(seed);
    let mut out = vec![];
    for steps in 1..=CHAIN_MAX_STEPS {
        for _ in 0..per_steps {
            let l = chain_line(&mut rng, steps);
            let (a, b) = answer_spans(&l)[0];
            out.push((l[..a].trim_end().to_string(), l[a..b].parse().expect("a number"), steps));
        }
    }
    out
}

/// For each token of `text` (given by its byte span `(start, end)`), the kind of the line it lies in
/// and whether it lies in one of that line's answers ([`answer_spans`]).
pub fn token_kinds(text: &str, spans: &[(usize, usize)]) -> Vec<(Kind, bool)> {
    // line start offsets and their classification
    let mut lines = vec![];
    let mut at = 0usize;
    for l in text.split_inclusive('\n') {
        let body = l.trim_end_matches('\n');
        let spans: Vec<(usize, usize)> = answer_spans(body).iter().map(|&(a, b)| (at + a, at + b)).collect();
        lines.push((at, at + body.len(), classify(body).0, spans));
        at += l.len();
    }
    spans
        .iter()
        .map(|&(s, e)| {
            // the token's first non-space byte decides (byte-level BPE tokens carry the space before a word)
            let s = s + text[s..e.max(s)].len() - text[s..e.max(s)].trim_start().len();
            match lines.iter().find(|(a, b, _, _)| s >= *a && s < (*b).max(*a + 1)) {
                Some((_, _, kind, answers)) => (*kind, answers.iter().any(|&(a, b)| s >= a && s < b.max(a + 1))),
                None => (Kind::Statement, false),
            }
        })
        .collect()
}

/// For each token of `text` (given by its byte span), the step count of the walk line it
/// lies in ([`chain_steps`]); `None` for tokens of other lines.
pub fn token_chain_steps(text: &str, spans: &[(usize, usize)]) -> Vec<Option<usize>> {
    let mut starts = vec![];
    let mut at = 0usize;
    for l in text.split_inclusive('\n') {
        starts.push((at, chain_steps(l.trim_end_matches('\n'))));
        at += l.len();
    }
    spans
        .iter()
        .map(|&(s, e)| {
            let s = s + text[s..e.max(s)].len() - text[s..e.max(s)].trim_start().len();
            let line = starts.partition_point(|&(a, _)| a <= s).checked_sub(1)?;
            starts[line].1
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

    /// Makes the moves of one question (`17 A C B`) by hand, from its text: the place reached.
    fn walk(q: &str) -> usize {
        let moves = walk_moves();
        let words: Vec<&str> = q.split(' ').collect();
        let mut at = words[0].parse::<usize>().unwrap() - 10;
        for w in &words[1..] {
            at = moves[WALK_MOVES.iter().position(|m| m == w).unwrap()][at];
        }
        at + 10
    }

    /// Walks a line's questions by hand (independently of how it was built): checks every answer
    /// and that all questions make as many moves as the opening says; returns that count.
    fn follow(l: &str) -> usize {
        let body = l.strip_prefix(CHAIN_OPENING).unwrap().trim_end_matches('.');
        let mut parts = body.split(". ");
        let head: Vec<&str> = parts.next().unwrap().split(' ').collect();
        let steps: usize = head[0].parse().unwrap();
        assert_eq!(head[1], if steps == 1 { "move" } else { "moves" }, "{l}");
        let mut questions = 0;
        for question in parts {
            let (q, answer) = question.split_once(" = ").unwrap();
            assert_eq!(q.split(' ').count(), steps + 1, "{l}");
            assert_eq!(walk(q), answer.parse::<usize>().unwrap(), "{l}");
            questions += 1;
        }
        assert_eq!(questions, CHAIN_QUESTIONS, "{l}");
        steps
    }

    #[test]
    fn the_moves_are_permutations_that_do_not_commute() {
        let m = walk_moves();
        assert_eq!(m, walk_moves());
        assert_eq!(m.len(), WALK_MOVES.len());
        for p in m {
            let mut seen = p.clone();
            seen.sort();
            assert_eq!(seen, (0..WALK_PLACES).collect::<Vec<_>>());
            assert!(p.iter().enumerate().any(|(i, &j)| i != j), "a move that stays put");
        }
        // the order of moves matters: no two commute, so only making them in turn gives the place
        for a in 0..m.len() {
            for b in a + 1..m.len() {
                assert!((0..WALK_PLACES).any(|p| m[a][m[b][p]] != m[b][m[a][p]]), "moves {a} and {b} commute");
            }
        }
    }

    #[test]
    fn chain_lines_are_right_and_say_their_difficulty() {
        let mut rng = Rng::new(11);
        for steps in 1..=CHAIN_MAX_STEPS {
            for _ in 0..50 {
                let l = chain_line(&mut rng, steps);
                assert_eq!(follow(&l), steps, "{l}");
                assert_eq!(chain_steps(&l), Some(steps), "{l}");
                assert_eq!(classify(&l).0, Kind::Manipulation, "{l}");
                let spans = answer_spans(&l);
                assert_eq!(spans.len(), CHAIN_QUESTIONS);
                for (a, b) in spans {
                    assert!(l[a..b].parse::<usize>().is_ok() && l[..a].ends_with(" = ") && l[b..].starts_with('.'), "{l}");
                }
            }
        }
        assert_eq!(chain_steps("Q: Where was Ba Ko born? A: Lima."), None);
        // task items: the prompt ends at the first ` =`, the answer is the walk made by hand
        let items = chain_task_items(4, 3);
        assert_eq!(items.len(), 3 * CHAIN_MAX_STEPS);
        for (prompt, answer, steps) in &items {
            assert!(prompt.ends_with(" =") && chain_steps(prompt) == Some(*steps), "{prompt}");
            let q = prompt.trim_end_matches(" =").rsplit(". ").next().unwrap();
            assert_eq!(q.split(' ').count(), steps + 1, "{prompt}");
            assert_eq!(walk(q), *answer, "{prompt}");
        }
        assert_eq!(chain_steps("Walk: 2 moves. 10 A B = 11."), Some(2));
        // tokens: the answers of every question are answer tokens, the start places are not
        let text = "Walk: 1 move. 11 A = 12. 12 B = 13.\n";
        let at = |needle: &str, nth: usize| text.match_indices(needle).nth(nth).unwrap().0;
        let spans = [(at(" 11", 0), at(" 11", 0) + 3), (at(" 12", 0), at(" 12", 0) + 3), (at(" 13", 0), at(" 13", 0) + 3)];
        assert_eq!(token_kinds(text, &spans), vec![(Kind::Manipulation, false), (Kind::Manipulation, true), (Kind::Manipulation, true)]);
        let two = format!("Q: Where was Ba Ko born? A: Lima.\n{text}");
        let shifted: Vec<(usize, usize)> = [(0, 2)].into_iter().chain(spans.iter().map(|&(a, b)| (a + 34, b + 34))).collect();
        assert_eq!(&two[34..39], "Walk:");
        assert_eq!(token_chain_steps(&two, &shifted), vec![None, Some(1), Some(1), Some(1)]);
        // the mix: about the asked share of walks, every difficulty present, deterministic
        let w = World::new(5, 10);
        let m = mixed_lines(&w, 9, 2000, 60);
        assert_eq!(m, mixed_lines(&w, 9, 2000, 60));
        let chains: Vec<usize> = m.iter().filter_map(|l| chain_steps(l)).collect();
        assert!((1100..1300).contains(&chains.len()), "{}", chains.len());
        for s in 1..=CHAIN_MAX_STEPS {
            assert!(chains.iter().filter(|&&c| c == s).count() > 90, "steps {s}");
        }
    }
}
