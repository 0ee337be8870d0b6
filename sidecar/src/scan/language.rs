//! Allowed languages: text reliably detected as another language is a finding.

use super::{Detector, Finding};

pub struct Language {
    allowed: Vec<String>,
}

/// Texts shorter than this are not judged: detection is unreliable on a few words.
const MIN_CHARS: usize = 24;

impl Language {
    pub fn new(allowed: &[String]) -> Self {
        Self { allowed: allowed.iter().map(|l| l.to_ascii_lowercase()).collect() }
    }
}

impl Detector for Language {
    fn detect(&self, text: &str) -> Result<Vec<Finding>, String> {
        if text.chars().filter(|c| c.is_alphabetic()).count() < MIN_CHARS {
            return Ok(vec![]);
        }
        let Some(info) = whatlang::detect(text) else { return Ok(vec![]) };
        if !info.is_reliable() {
            return Ok(vec![]);
        }
        let code = iso639_1(info.lang());
        Ok(if self.allowed.iter().any(|a| a == code) {
            vec![]
        } else {
            vec![Finding::whole(text, "language", info.confidence() as f32)]
        })
    }
}

fn iso639_1(l: whatlang::Lang) -> &'static str {
    use whatlang::Lang::*;
    match l {
        Epo => "eo",
        Eng => "en",
        Rus => "ru",
        Cmn => "zh",
        Spa => "es",
        Por => "pt",
        Ita => "it",
        Ben => "bn",
        Fra => "fr",
        Deu => "de",
        Ukr => "uk",
        Kat => "ka",
        Ara => "ar",
        Hin => "hi",
        Jpn => "ja",
        Heb => "he",
        Yid => "yi",
        Pol => "pl",
        Amh => "am",
        Jav => "jv",
        Kor => "ko",
        Nob => "no",
        Dan => "da",
        Swe => "sv",
        Fin => "fi",
        Tur => "tr",
        Nld => "nl",
        Hun => "hu",
        Ces => "cs",
        Ell => "el",
        Bul => "bg",
        Bel => "be",
        Mar => "mr",
        Kan => "kn",
        Ron => "ro",
        Slv => "sl",
        Hrv => "hr",
        Srp => "sr",
        Mkd => "mk",
        Lit => "lt",
        Lav => "lv",
        Est => "et",
        Tam => "ta",
        Vie => "vi",
        Urd => "ur",
        Tha => "th",
        Guj => "gu",
        Uzb => "uz",
        Pan => "pa",
        Aze => "az",
        Ind => "id",
        Tel => "te",
        Pes => "fa",
        Mal => "ml",
        Ori => "or",
        Mya => "my",
        Nep => "ne",
        Sin => "si",
        Khm => "km",
        Tuk => "tk",
        Aka => "ak",
        Zul => "zu",
        Sna => "sn",
        Afr => "af",
        Lat => "la",
        Slk => "sk",
        Cat => "ca",
        Tgl => "tl",
        Hye => "hy",
        Cym => "cy",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn other_languages_are_found() {
        let l = Language::new(&["en".into(), "de".into()]);
        assert!(l.detect("The quick brown fox jumps over the lazy dog near the river bank.").unwrap().is_empty());
        assert!(l.detect("Der schnelle braune Fuchs springt über den faulen Hund am Fluss.").unwrap().is_empty());
        assert_eq!(l.detect("El rápido zorro marrón salta sobre el perro perezoso junto al río.").unwrap().len(), 1);
        assert!(l.detect("ok gracias").unwrap().is_empty(), "too short to judge");
    }
}
