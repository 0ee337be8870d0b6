//! Output must be valid JSON, optionally valid against a JSON Schema. Markdown code fences
//! around the JSON are tolerated.

use super::{Detector, Finding};

pub struct Json {
    validator: Option<jsonschema::Validator>,
}

impl Json {
    pub fn new(schema: Option<&serde_json::Value>) -> Result<Self, String> {
        let validator = schema
            .map(|s| jsonschema::validator_for(s).map_err(|e| format!("invalid JSON Schema: {e}")))
            .transpose()?;
        Ok(Self { validator })
    }
}

fn strip_fences(text: &str) -> &str {
    let t = text.trim();
    let Some(rest) = t.strip_prefix("```") else { return t };
    let rest = rest.split_once('\n').map_or("", |(_, body)| body);
    rest.trim_end().strip_suffix("```").unwrap_or(rest).trim()
}

impl Detector for Json {
    fn detect(&self, text: &str) -> Result<Vec<Finding>, String> {
        let value: serde_json::Value = match serde_json::from_str(strip_fences(text)) {
            Ok(v) => v,
            Err(_) => return Ok(vec![Finding::whole(text, "invalid-json", 1.0)]),
        };
        if let Some(v) = &self.validator
            && !v.is_valid(&value)
        {
            return Ok(vec![Finding::whole(text, "schema-mismatch", 1.0)]);
        }
        Ok(vec![])
    }

    fn whole_request(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn json_and_schema() {
        let j = Json::new(Some(&json!({"type": "object", "required": ["a"]}))).unwrap();
        assert!(j.detect("{\"a\": 1}").unwrap().is_empty());
        assert!(j.detect("```json\n{\"a\": 1}\n```").unwrap().is_empty());
        assert_eq!(j.detect("{\"b\": 1}").unwrap()[0].kind, "schema-mismatch");
        assert_eq!(j.detect("not json").unwrap()[0].kind, "invalid-json");
        assert!(Json::new(Some(&json!({"type": 7}))).is_err());
    }
}
