//! A small drawing list (rectangles, axis lines, text) rendered two ways: SVG, and PNG through
//! our own rasterizer with the public-domain 8x8 bitmap font of the `font8x8` crate. Both
//! renderings come from the same list, so they show the same thing, and neither needs a system
//! font or a graphics library: the PNG is byte-identical on every machine.

/// An RGB colour.
pub type Rgb = [u8; 3];

pub const WHITE: Rgb = [255, 255, 255];
pub const BLACK: Rgb = [0, 0, 0];

/// How a text's x coordinate is read.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Anchor {
    Start,
    Middle,
}

/// One thing to draw, in SVG user units (y grows downwards).
#[derive(Debug, Clone, PartialEq)]
pub enum Item {
    /// A filled rectangle, with an optional tooltip (SVG only).
    Rect { x: f64, y: f64, w: f64, h: f64, fill: Rgb, title: Option<String> },
    Line { x1: f64, y1: f64, x2: f64, y2: f64, color: Rgb },
    /// Text whose baseline is at `y`.
    Text { x: f64, y: f64, size: f64, anchor: Anchor, text: String },
}

/// A picture: a white canvas and what is drawn on it, in order.
#[derive(Debug, Clone, Default)]
pub struct Scene {
    pub width: f64,
    pub height: f64,
    pub items: Vec<Item>,
}

fn hex(c: Rgb) -> String {
    format!("#{:02x}{:02x}{:02x}", c[0], c[1], c[2])
}

fn xml(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

impl Scene {
    pub fn new(width: f64, height: f64) -> Self {
        Scene { width, height, items: vec![] }
    }

    pub fn rect(&mut self, x: f64, y: f64, w: f64, h: f64, fill: Rgb, title: Option<String>) {
        self.items.push(Item::Rect { x, y, w, h, fill, title });
    }

    pub fn line(&mut self, x1: f64, y1: f64, x2: f64, y2: f64) {
        self.items.push(Item::Line { x1, y1, x2, y2, color: BLACK });
    }

    pub fn text(&mut self, x: f64, y: f64, size: f64, anchor: Anchor, text: impl Into<String>) {
        self.items.push(Item::Text { x, y, size, anchor, text: text.into() });
    }

    /// The scene as an SVG document.
    pub fn to_svg(&self) -> String {
        let mut s = format!(
            "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{}\" height=\"{}\" font-family=\"sans-serif\" font-size=\"11\">\n<!-- {} -->\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n",
            self.width, self.height, crate::output::FILE_MARK
        );
        for it in &self.items {
            match it {
                Item::Rect { x, y, w, h, fill, title } => {
                    let t = title.as_ref().map(|t| format!("<title>{}</title>", xml(t))).unwrap_or_default();
                    s += &format!("<rect x=\"{x:.1}\" y=\"{y:.1}\" width=\"{w:.1}\" height=\"{h:.1}\" fill=\"{}\">{t}</rect>\n", hex(*fill));
                }
                Item::Line { x1, y1, x2, y2, color } => {
                    s += &format!("<line x1=\"{x1:.1}\" y1=\"{y1:.1}\" x2=\"{x2:.1}\" y2=\"{y2:.1}\" stroke=\"{}\"/>\n", hex(*color));
                }
                Item::Text { x, y, size, anchor, text } => {
                    let a = if *anchor == Anchor::Middle { " text-anchor=\"middle\"" } else { "" };
                    s += &format!("<text x=\"{x:.1}\" y=\"{y:.1}\" font-size=\"{size}\"{a}>{}</text>\n", xml(text));
                }
            }
        }
        s += "</svg>\n";
        s
    }

    /// The scene rasterized at `scale` pixels per unit, as RGB pixels (row-major) and size.
    pub fn rasterize(&self, scale: u32) -> (Vec<u8>, u32, u32) {
        let k = scale as f64;
        let (w, h) = ((self.width * k).ceil() as u32, (self.height * k).ceil() as u32);
        let mut px = vec![255u8; (w * h * 3) as usize];
        let mut put = |x: i64, y: i64, c: Rgb| {
            if x >= 0 && y >= 0 && (x as u32) < w && (y as u32) < h {
                let i = ((y as u32 * w + x as u32) * 3) as usize;
                px[i..i + 3].copy_from_slice(&c);
            }
        };
        for it in &self.items {
            match it {
                Item::Rect { x, y, w: rw, h: rh, fill, .. } => {
                    let (x0, y0) = ((x * k).round() as i64, (y * k).round() as i64);
                    let (x1, y1) = (((x + rw) * k).round() as i64, ((y + rh) * k).round() as i64);
                    for yy in y0..y1 {
                        for xx in x0..x1 {
                            put(xx, yy, *fill);
                        }
                    }
                }
                Item::Line { x1, y1, x2, y2, color } => {
                    let (ax, ay, bx, by) = (x1 * k, y1 * k, x2 * k, y2 * k);
                    let n = (bx - ax).abs().max((by - ay).abs()).ceil().max(1.0) as i64;
                    for i in 0..=n {
                        let t = i as f64 / n as f64;
                        let (x, y) = ((ax + (bx - ax) * t).round() as i64, (ay + (by - ay) * t).round() as i64);
                        for d in 0..scale as i64 {
                            // a line one unit thick
                            if (bx - ax).abs() >= (by - ay).abs() {
                                put(x, y - scale as i64 / 2 + d, *color);
                            } else {
                                put(x - scale as i64 / 2 + d, y, *color);
                            }
                        }
                    }
                }
                Item::Text { x, y, size, anchor, text } => {
                    // glyph pixels: the 8x8 cell scaled by a whole number, so that a character
                    // is about as wide as a sans-serif one of this size (0.6-0.8 em)
                    let g = ((size * k / 10.0).floor() as i64).max(1);
                    let chars: Vec<char> = text.chars().collect();
                    let tw = chars.len() as i64 * 8 * g;
                    let mut cx = (x * k).round() as i64 - if *anchor == Anchor::Middle { tw / 2 } else { 0 };
                    let top = (y * k).round() as i64 - 7 * g;
                    for ch in chars {
                        let glyph = font8x8::legacy::BASIC_LEGACY.get(ch as usize).copied().unwrap_or([0; 8]);
                        for (row, bits) in glyph.iter().enumerate() {
                            for col in 0..8 {
                                if bits >> col & 1 == 1 {
                                    for dy in 0..g {
                                        for dx in 0..g {
                                            put(cx + col * g + dx, top + row as i64 * g + dy, BLACK);
                                        }
                                    }
                                }
                            }
                        }
                        cx += 8 * g;
                    }
                }
            }
        }
        (px, w, h)
    }

    /// The scene as a PNG file at `scale` pixels per unit.
    pub fn to_png(&self, scale: u32) -> Vec<u8> {
        let (px, w, h) = self.rasterize(scale);
        let mut out = Vec::new();
        {
            let mut enc = png::Encoder::new(&mut out, w, h);
            enc.set_color(png::ColorType::Rgb);
            enc.set_depth(png::BitDepth::Eight);
            enc.add_text_chunk("Software".into(), crate::output::FILE_MARK.into()).expect("PNG text chunk");
            let mut wr = enc.write_header().expect("PNG header into memory");
            wr.write_image_data(&px).expect("PNG data into memory");
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rectangles_lines_and_text_land_where_the_svg_puts_them() {
        let mut s = Scene::new(40.0, 20.0);
        s.rect(2.0, 3.0, 10.0, 5.0, [10, 20, 30], None);
        s.line(0.0, 15.0, 40.0, 15.0);
        s.text(20.0, 12.0, 8.0, Anchor::Start, "I");
        let (px, w, h) = s.rasterize(2);
        assert_eq!((w, h), (80, 40));
        let at = |x: u32, y: u32| -> Rgb { let i = ((y * w + x) * 3) as usize; [px[i], px[i + 1], px[i + 2]] };
        assert_eq!(at(4, 6), [10, 20, 30]); // inside the rectangle (2..12 x 3..8 units)
        assert_eq!(at(23, 15), [10, 20, 30]);
        assert_eq!(at(24, 6), WHITE); // just right of it
        assert_eq!(at(10, 30), BLACK); // on the line at y = 15
        assert_eq!(at(10, 26), WHITE);
        // the "I" glyph has ink in its middle column near x = 20..28 units, above the baseline
        let ink = (40..56).flat_map(|x| (10..24).map(move |y| (x, y))).filter(|&(x, y)| at(x, y) == BLACK).count();
        assert!(ink > 10, "{ink}");
        assert!(s.to_svg().contains("<rect x=\"2.0\" y=\"3.0\" width=\"10.0\" height=\"5.0\" fill=\"#0a141e\">"));
    }
}
