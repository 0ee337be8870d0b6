//! Invisible text: zero-width characters, bidirectional controls and Unicode tag characters,
//! the usual carriers of hidden instructions and "ASCII smuggling".

use super::{Detector, Finding};

pub struct Invisible;

pub fn is_invisible(c: char) -> bool {
    matches!(c,
        '\u{200B}'..='\u{200F}'   // zero-width space/joiners, LRM, RLM
        | '\u{202A}'..='\u{202E}' // bidi embeddings and overrides
        | '\u{2060}'..='\u{2064}' // word joiner, invisible operators
        | '\u{2066}'..='\u{2069}' // bidi isolates
        | '\u{061C}'              // Arabic letter mark
        | '\u{FEFF}'              // zero-width no-break space (BOM)
        | '\u{180E}'              // Mongolian vowel separator
        | '\u{E0000}'..='\u{E007F}' // tag characters
    )
}

impl Detector for Invisible {
    fn detect(&self, text: &str) -> Result<Vec<Finding>, String> {
        let mut out: Vec<Finding> = vec![];
        for (i, c) in text.char_indices() {
            if is_invisible(c) {
                let end = i + c.len_utf8();
                // Merge runs so a smuggled sentence is one finding.
                match out.last_mut() {
                    Some(last) if last.end == i => last.end = end,
                    _ => out.push(Finding::span(i, end, "invisible")),
                }
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_runs_of_hidden_characters() {
        let tag: String = "ignore".chars().map(|c| char::from_u32(0xE0000 + c as u32).unwrap()).collect();
        let text = format!("hello{tag} wor\u{200B}ld \u{202E}txt");
        let f = Invisible.detect(&text).unwrap();
        assert_eq!(f.len(), 3);
        assert_eq!(&text[f[0].start..f[0].end], tag);
        assert!(Invisible.detect("plain text, emoji 👍🏽 and accents é").unwrap().is_empty());
    }
}
