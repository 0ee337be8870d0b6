//! JSON read as it streams in pieces (a tool call's arguments, a piece per event): its structure
//! passes through as it came, and the text of each string value, key and number is read for the
//! scanners (strings decoded), then written again, so a redaction keeps the JSON valid.

/// What a piece of JSON holds, in order.
#[derive(Debug, PartialEq, Eq)]
pub enum Piece {
    /// Structure, literals, and the quotes around strings: as they came.
    Raw(String),
    /// Decoded text of the string value being read.
    Text(String),
    /// The string value being read has ended (its closing quote is the next `Raw`).
    End,
    /// A whole key, decoded (its quotes are the `Raw`s around it), and the object it names a
    /// value of.
    Key(String, Object),
    /// A whole number inside a container, as written.
    Number(String),
}

/// One object of a document, told apart from the others.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Object(u64);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Frame {
    /// In an object; whether the next string is a key.
    Object {
        key_next: bool,
        id: Object,
    },
    Array,
}

/// The keys written into each object so far, so that a key the scanners rewrote does not take
/// the name of one written before it.
#[derive(Debug, Default)]
pub struct Written(std::collections::HashMap<Object, std::collections::HashSet<String>>);

impl Written {
    /// The name `key` is written with in `object`: itself, or, when the scanners rewrote it into
    /// a name already written there, the next free one (`key (2)`, `key (3)`, ...).
    pub fn name(&mut self, object: Object, key: String, rewritten: bool) -> String {
        let names = self.0.entry(object).or_default();
        let (mut unique, mut n) = (key.clone(), 1);
        while rewritten && names.contains(&unique) {
            n += 1;
            unique = format!("{key} ({n})");
        }
        names.insert(unique.clone());
        unique
    }

    fn forget(&mut self, object: Object) {
        self.0.remove(&object);
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
enum State {
    #[default]
    Between,
    /// In a key (read whole); after a backslash, whether the next character is escaped.
    Key { escaped: bool },
    /// In a string value (decoded).
    Value,
    /// In a number (read whole).
    Number,
}

/// The reader of one JSON document arriving in pieces.
#[derive(Debug, Default)]
pub struct PartialJson {
    stack: Vec<Frame>,
    /// Containers open beyond `MAX_DEPTH`: not tracked, and every string in them is a value.
    deeper: usize,
    state: State,
    /// The start of an escape sequence cut off at the end of the last piece.
    pending: String,
    /// The key or number read so far.
    token: String,
    /// A key or number went past `MAX_TOKEN`: the document cannot be scanned.
    overflowed: bool,
    /// Objects opened so far.
    objects: u64,
    /// The keys written into the objects still open (or closed in the last piece).
    written: Written,
    /// Objects closed in the last piece: their keys are forgotten with the next.
    closed: Vec<Object>,
}

/// How long a key or number may be: each is held whole until it ends.
const MAX_TOKEN: usize = 64 << 10;

/// How deep the structure is tracked; in deeper JSON every string is read as a value, so none
/// goes unscanned.
const MAX_DEPTH: usize = 128;

impl PartialJson {
    /// Whether a string value is open: its text so far may still grow.
    pub fn in_value(&self) -> bool {
        self.state == State::Value
    }

    /// Whether a key or number was longer than can be held to be scanned whole.
    pub fn overflowed(&self) -> bool {
        self.overflowed
    }

    /// The document was cut off where it is (its part ended): the key or number still open, as
    /// far as it came.
    pub fn cut(&mut self) -> Option<Piece> {
        let piece = match self.state {
            State::Number => Piece::Number(std::mem::take(&mut self.token)),
            State::Key { .. } => Piece::Key(decode(&std::mem::take(&mut self.token)), self.object()),
            _ => return None,
        };
        self.state = State::Between;
        Some(piece)
    }

    /// The name a key of `object` is written with (see [`Written::name`]).
    pub fn key_name(&mut self, object: Object, key: String, rewritten: bool) -> String {
        self.written.name(object, key, rewritten)
    }

    /// The object a key read now belongs to.
    fn object(&self) -> Object {
        match self.stack.last() {
            Some(Frame::Object { id, .. }) => *id,
            _ => Object(u64::MAX),
        }
    }

    /// The start of an escape the document ended in, as it came.
    pub fn take_pending(&mut self) -> String {
        std::mem::take(&mut self.pending)
    }

    fn push_token(&mut self, c: char) {
        if self.token.len() >= MAX_TOKEN {
            self.overflowed = true;
        } else {
            self.token.push(c);
        }
    }

    /// Reads the next piece of the document.
    pub fn feed(&mut self, piece: &str) -> Vec<Piece> {
        for object in std::mem::take(&mut self.closed) {
            self.written.forget(object);
        }
        let input = std::mem::take(&mut self.pending) + piece;
        let mut out = Pieces::default();
        let mut rest = input.as_str();
        while let Some(c) = rest.chars().next() {
            let len = c.len_utf8();
            match self.state {
                State::Between if self.number_starts(c) => {
                    self.push_token(c);
                    self.state = State::Number;
                }
                State::Between => {
                    self.structure(c);
                    out.raw(c);
                }
                State::Number if matches!(c, '0'..='9' | '.' | 'e' | 'E' | '+' | '-') => self.push_token(c),
                State::Number => {
                    // The number ended before `c`, which is read again as structure.
                    out.0.push(Piece::Number(std::mem::take(&mut self.token)));
                    self.state = State::Between;
                    continue;
                }
                State::Key { escaped: false } if c == '"' => {
                    let key = decode(&std::mem::take(&mut self.token));
                    out.0.push(Piece::Key(key, self.object()));
                    out.raw(c);
                    self.state = State::Between;
                }
                State::Key { escaped } => {
                    self.push_token(c);
                    self.state = State::Key { escaped: !escaped && c == '\\' };
                }
                State::Value if c == '"' => {
                    out.end();
                    out.raw(c);
                    self.state = State::Between;
                }
                State::Value if c == '\\' => match unescape(rest) {
                    Escape::Char(ch, used) => {
                        out.text(ch);
                        rest = &rest[used..];
                        continue;
                    }
                    Escape::Incomplete => {
                        self.pending = rest.to_owned();
                        break;
                    }
                },
                State::Value => out.text(c),
            }
            rest = &rest[len..];
        }
        out.0
    }

    /// Whether `c` starts a number that is a value in a container (a top-level number is left as
    /// it is: nothing after it would end it).
    fn number_starts(&self, c: char) -> bool {
        (c == '-' || c.is_ascii_digit())
            && (self.deeper > 0
                || matches!(self.stack.last(), Some(Frame::Array | Frame::Object { key_next: false, .. })))
    }

    /// A character between strings: opens and closes containers, and tells keys from values.
    fn structure(&mut self, c: char) {
        match c {
            '{' | '[' if self.stack.len() >= MAX_DEPTH => self.deeper += 1,
            '{' => {
                self.stack.push(Frame::Object { key_next: true, id: Object(self.objects) });
                self.objects += 1;
            }
            '[' => self.stack.push(Frame::Array),
            '}' | ']' if self.deeper > 0 => self.deeper -= 1,
            '}' | ']' => {
                if let Some(Frame::Object { id, .. }) = self.stack.pop() {
                    self.closed.push(id);
                }
            }
            '"' if self.deeper > 0 => self.state = State::Value,
            _ if self.deeper > 0 => {}
            ':' | ',' => {
                if let Some(Frame::Object { key_next, .. }) = self.stack.last_mut() {
                    *key_next = c == ',';
                }
            }
            '"' => {
                self.state = match self.stack.last() {
                    Some(Frame::Object { key_next: true, .. }) => State::Key { escaped: false },
                    _ => State::Value,
                };
            }
            _ => {}
        }
    }
}

/// Pieces as they are read, runs of the same kind joined.
#[derive(Default)]
struct Pieces(Vec<Piece>);

impl Pieces {
    fn raw(&mut self, c: char) {
        match self.0.last_mut() {
            Some(Piece::Raw(s)) => s.push(c),
            _ => self.0.push(Piece::Raw(c.into())),
        }
    }

    fn text(&mut self, c: char) {
        match self.0.last_mut() {
            Some(Piece::Text(s)) => s.push(c),
            _ => self.0.push(Piece::Text(c.into())),
        }
    }

    fn end(&mut self) {
        self.0.push(Piece::End);
    }
}

enum Escape {
    /// The character an escape stands for, and the bytes it took.
    Char(char, usize),
    /// The escape goes on in the next piece.
    Incomplete,
}

/// Decodes the escape at the start of `s` (which begins with a backslash). One that is not JSON
/// stands for itself, so nothing is lost; a lone surrogate becomes U+FFFD.
fn unescape(s: &str) -> Escape {
    let b = s.as_bytes();
    let Some(&kind) = b.get(1) else { return Escape::Incomplete };
    let simple = match kind {
        b'"' => '"',
        b'\\' => '\\',
        b'/' => '/',
        b'b' => '\u{8}',
        b'f' => '\u{c}',
        b'n' => '\n',
        b'r' => '\r',
        b't' => '\t',
        b'u' => return unicode(s),
        _ => return Escape::Char('\\', 1),
    };
    Escape::Char(simple, 2)
}

/// A `\uXXXX` escape, or a surrogate pair of two.
fn unicode(s: &str) -> Escape {
    let hex = |at: usize| -> Option<Option<u32>> {
        let digits = s.get(at..at + 4)?;
        Some(u32::from_str_radix(digits, 16).ok().filter(|_| digits.bytes().all(|b| b.is_ascii_hexdigit())))
    };
    let Some(first) = hex(2) else {
        // Fewer than four characters after `\u` so far (or a cut inside a multi-byte one).
        return if s.len() < 6 { Escape::Incomplete } else { Escape::Char('\\', 1) };
    };
    let Some(high) = first else { return Escape::Char('\\', 1) };
    if !(0xD800..0xDC00).contains(&high) {
        return Escape::Char(char::from_u32(high).unwrap_or('\u{FFFD}'), 6);
    }
    // A high surrogate: its low half should follow as a second escape, maybe in the next piece.
    let next = &s[6..];
    let may_follow = next.len() < 6
        && next.bytes().enumerate().all(|(i, b)| match i {
            0 => b == b'\\',
            1 => b == b'u',
            _ => b.is_ascii_hexdigit(),
        });
    if may_follow {
        return Escape::Incomplete;
    }
    match (s.get(6..8), hex(8)) {
        (Some("\\u"), Some(Some(low))) if (0xDC00..0xE000).contains(&low) => {
            let c = 0x10000 + ((high - 0xD800) << 10) + (low - 0xDC00);
            Escape::Char(char::from_u32(c).unwrap_or('\u{FFFD}'), 12)
        }
        _ => Escape::Char('\u{FFFD}', 6),
    }
}

/// The text of the inside of a whole JSON string; a broken escape stands for itself, and a lone
/// surrogate at its end becomes U+FFFD (as inside the string).
fn decode(raw: &str) -> String {
    let mut out = String::with_capacity(raw.len());
    let mut rest = raw;
    while let Some(c) = rest.chars().next() {
        if c == '\\' {
            match unescape(rest) {
                Escape::Char(ch, used) => {
                    out.push(ch);
                    rest = &rest[used..];
                    continue;
                }
                // Nothing follows: a high surrogate without its low half, or a cut escape.
                Escape::Incomplete if rest.starts_with("\\u") && rest.len() >= 6 => {
                    out.push('\u{FFFD}');
                    rest = &rest[6..];
                    continue;
                }
                Escape::Incomplete => {
                    out.push_str(rest);
                    break;
                }
            }
        }
        out.push(c);
        rest = &rest[c.len_utf8()..];
    }
    out
}

/// A number as written back: itself, or a JSON string once the scanners rewrote it.
pub fn number(written: &str, scanned: &str) -> String {
    if written == scanned { written.to_owned() } else { format!("\"{}\"", encode(scanned)) }
}

/// Text as the inside of a JSON string.
pub fn encode(text: &str) -> String {
    let quoted = serde_json::Value::String(text.to_owned()).to_string();
    quoted[1..quoted.len() - 1].to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reads `json` in pieces of `size` characters; returns the decoded string values and the
    /// document written back with each value's text passed through `f`.
    fn read(json: &str, size: usize, f: impl Fn(&str) -> String) -> (Vec<String>, String) {
        let chars: Vec<char> = json.chars().collect();
        let mut reader = PartialJson::default();
        let (mut values, mut current, mut back) = (vec![], String::new(), String::new());
        for piece in chars.chunks(size) {
            for p in reader.feed(&piece.iter().collect::<String>()) {
                match p {
                    Piece::Raw(s) => back.push_str(&s),
                    Piece::Text(t) => current.push_str(&t),
                    Piece::End => {
                        back.push_str(&encode(&f(&current)));
                        values.push(std::mem::take(&mut current));
                    }
                    Piece::Key(k, object) => {
                        let scanned = f(&k);
                        let rewritten = scanned != k;
                        back.push_str(&encode(&reader.key_name(object, scanned, rewritten)));
                        values.push(k);
                    }
                    Piece::Number(n) => {
                        back.push_str(&number(&n, &f(&n)));
                        values.push(n);
                    }
                }
            }
        }
        (values, back)
    }

    #[test]
    fn values_are_decoded_and_keys_and_structure_pass_through_in_any_pieces() {
        let json =
            r#"{"token": "sk\u002dA\"B\\C", "nested": {"list": ["x\ud83d\ude00y", 2, true, null]}, "k\"ey": "v\/w\n"}"#;
        for size in [1, 2, 3, 5, 7, 200] {
            let (values, back) = read(json, size, str::to_owned);
            let want = ["token", "sk-A\"B\\C", "nested", "list", "x😀y", "2", "k\"ey", "v/w\n"];
            assert_eq!(values, want, "pieces of {size}");
            let same: serde_json::Value = serde_json::from_str(&back).unwrap();
            assert_eq!(same, serde_json::from_str::<serde_json::Value>(json).unwrap(), "pieces of {size}");
        }
    }

    #[test]
    fn keys_and_numbers_are_read_whole_and_a_rewritten_number_becomes_a_string() {
        let json = r#"{"card": 4111111111111111, "n": [-1.5e3, 7], "AKIA\u0041": {"x": 0}}"#;
        for size in [1, 2, 3, 5, 200] {
            let f = |t: &str| if t.len() > 12 || t.starts_with("AKIA") { "[X]".to_owned() } else { t.to_owned() };
            let (values, back) = read(json, size, f);
            assert_eq!(values, ["card", "4111111111111111", "n", "-1.5e3", "7", "AKIAA", "x", "0"], "pieces of {size}");
            let v: serde_json::Value = serde_json::from_str(&back).unwrap();
            assert_eq!(v, serde_json::json!({"card": "[X]", "n": [-1.5e3, 7], "[X]": {"x": 0}}), "pieces of {size}");
        }
        let (values, _) = read(r#"{"k\ud83d": 1}"#, 2, str::to_owned);
        assert_eq!(values, ["k\u{FFFD}", "1"], "a lone surrogate ending a key");
        let (values, back) = read("42", 1, |_| "[X]".into());
        assert_eq!((values.len(), back.as_str()), (0, "42"), "a number alone is no container's value");
    }

    #[test]
    fn a_rewritten_key_takes_a_name_no_key_of_its_object_had_before_it() {
        let json = r#"{"x (2)": 0, "s1": {"x": 2, "s2": 1}, "s3": [{"s4": 3}], "s5": 4, "s6": 6}"#;
        for size in [1, 3, 200] {
            let (_, back) = read(json, size, |t| if t.starts_with('s') { "x".into() } else { t.into() });
            let v: serde_json::Value = serde_json::from_str(&back).unwrap();
            let want =
                serde_json::json!({"x (2)": 0, "x": {"x": 2, "x (2)": 1}, "x (3)": [{"x": 3}], "x (4)": 4, "x (5)": 6});
            assert_eq!(v, want, "pieces of {size}: {back}");
            assert_eq!(back.matches("\"x").count(), 8, "every key written, none twice in one object: {back}");
        }
    }

    #[test]
    fn a_key_longer_than_can_be_held_is_told() {
        let mut reader = PartialJson::default();
        let _ = reader.feed("{\"");
        for _ in 0..65 {
            let _ = reader.feed(&"k".repeat(1024));
            assert!(reader.token.len() <= MAX_TOKEN);
        }
        assert!(reader.overflowed());
    }

    #[test]
    fn a_rewritten_value_keeps_the_document_valid() {
        let json = r#"{"a": "secret \"quoted\"", "b": ["keep", "secret"]}"#;
        let (_, back) = read(json, 4, |t| if t.contains("secret") { "said \"no\" \\ [X]".into() } else { t.into() });
        let v: serde_json::Value = serde_json::from_str(&back).unwrap();
        assert_eq!(v, serde_json::json!({"a": "said \"no\" \\ [X]", "b": ["keep", "said \"no\" \\ [X]"]}));
    }

    #[test]
    fn strings_deeper_than_the_tracked_depth_are_all_values() {
        let deep = format!("{}{{\"a\": [\"x\", \"secret\"], \"b\": \"y\"}}{}", "[".repeat(200), "]".repeat(200));
        let (values, back) = read(&deep, 7, str::to_owned);
        assert_eq!(values, ["a", "x", "secret", "b", "y"], "keys too, past the depth: nothing is passed unread");
        assert_eq!(back, deep);
        let (values, _) = read(&format!("{}{}{{\"k\": \"v\"}}", "[".repeat(200), "]".repeat(200)), 3, str::to_owned);
        assert_eq!(values, ["k", "v"], "back at a tracked depth, keys are keys again");
    }

    #[test]
    fn broken_escapes_and_lone_surrogates_lose_nothing_and_never_panic() {
        let (values, _) = read(r#"["\q", "\u12G4", "\ud800x", "\ud800\u0041", "é\u00e9"]"#, 1, str::to_owned);
        assert_eq!(values, ["\\q", "\\u12G4", "\u{FFFD}x", "\u{FFFD}A", "éé"]);
        let mut reader = PartialJson::default();
        for junk in ["}}]]\"", "\\", "u", "d8", "00", "\\", "\"", "{\"a\":\"\\u", "é"] {
            let _ = reader.feed(junk);
        }
    }
}
