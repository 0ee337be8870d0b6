//! Kubernetes label-selector semantics (`matchLabels` and `matchExpressions`), pure.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;

/// Whether `labels` satisfy `selector`. An empty selector selects everything.
pub fn matches(selector: &LabelSelector, labels: &BTreeMap<String, String>) -> bool {
    let labels_ok = selector.match_labels.iter().flatten().all(|(k, v)| labels.get(k) == Some(v));
    let exprs_ok = selector.match_expressions.iter().flatten().all(|e| {
        let value = labels.get(&e.key);
        let values = e.values.as_deref().unwrap_or_default();
        match e.operator.as_str() {
            "In" => value.is_some_and(|v| values.contains(v)),
            "NotIn" => value.is_none_or(|v| !values.contains(v)),
            "Exists" => value.is_some(),
            "DoesNotExist" => value.is_none(),
            _ => false,
        }
    });
    labels_ok && exprs_ok
}

/// An error for an operator or value list a selector cannot have.
pub fn validate(selector: &LabelSelector) -> Result<(), String> {
    for (i, e) in selector.match_expressions.iter().flatten().enumerate() {
        let n = e.values.as_ref().map_or(0, Vec::len);
        match e.operator.as_str() {
            "In" | "NotIn" if n == 0 => {
                return Err(format!("matchExpressions[{i}]: operator {} needs at least one value", e.operator));
            }
            "Exists" | "DoesNotExist" if n > 0 => {
                return Err(format!("matchExpressions[{i}]: operator {} takes no values", e.operator));
            }
            "In" | "NotIn" | "Exists" | "DoesNotExist" => {}
            other => {
                return Err(format!(
                    "matchExpressions[{i}]: unknown operator {other:?}; use In, NotIn, Exists or DoesNotExist"
                ));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelectorRequirement;

    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    fn expr(key: &str, op: &str, values: &[&str]) -> LabelSelectorRequirement {
        LabelSelectorRequirement {
            key: key.into(),
            operator: op.into(),
            values: (!values.is_empty()).then(|| values.iter().map(|v| v.to_string()).collect()),
        }
    }

    #[test]
    fn match_labels_and_expressions() {
        let sel = LabelSelector {
            match_labels: Some(labels(&[("app", "bot")])),
            match_expressions: Some(vec![expr("tier", "In", &["gold", "silver"]), expr("legacy", "DoesNotExist", &[])]),
        };
        assert!(matches(&sel, &labels(&[("app", "bot"), ("tier", "gold")])));
        assert!(!matches(&sel, &labels(&[("app", "bot"), ("tier", "bronze")])));
        assert!(!matches(&sel, &labels(&[("app", "bot"), ("tier", "gold"), ("legacy", "1")])));
        assert!(!matches(&sel, &labels(&[("tier", "gold")])));
        assert!(matches(&LabelSelector::default(), &labels(&[])));
        let not_in =
            LabelSelector { match_expressions: Some(vec![expr("env", "NotIn", &["prod"])]), ..Default::default() };
        assert!(matches(&not_in, &labels(&[])));
        assert!(!matches(&not_in, &labels(&[("env", "prod")])));
    }

    #[test]
    fn invalid_selectors_are_explained() {
        let bad = |e| LabelSelector { match_expressions: Some(vec![e]), ..Default::default() };
        assert_eq!(
            validate(&bad(expr("a", "In", &[]))).unwrap_err(),
            "matchExpressions[0]: operator In needs at least one value"
        );
        assert_eq!(
            validate(&bad(expr("a", "Exists", &["x"]))).unwrap_err(),
            "matchExpressions[0]: operator Exists takes no values"
        );
        assert!(validate(&bad(expr("a", "Equals", &["x"]))).unwrap_err().contains("unknown operator \"Equals\""));
    }
}
