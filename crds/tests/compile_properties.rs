//! Property tests of `compile()`: the same resources, in any order, compile to the same config
//! and the same rejections, every time.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use bulwark_api::{CompileOptions, Workload, compile, manifest};
use proptest::prelude::*;

/// One resource as YAML: routes that overlap on models and hosts (ties are the interesting
/// case), some invalid, some naming policies that may not exist; policies, some invalid; a
/// rollout over two of the backends.
fn resource() -> impl Strategy<Value = String> {
    let ns = prop::sample::select(vec!["team-a", "team-b"]);
    let route = (
        0u8..6,
        ns.clone(),
        prop::sample::select(vec!["gpt-*", "gpt-4o*", "claude-*", "*"]),
        0u32..4,
        prop::option::of(0u8..3),
        any::<bool>(),
        prop::option::of(prop::sample::select(vec!["app: chat", "app: bot"])),
    )
        .prop_map(|(n, ns, model, weight, policy, valid, selector)| {
            let policy = policy.map(|p| format!("\n    scannerPolicyRef: {{name: guard-{p}}}")).unwrap_or_default();
            let url = if valid { "http://stable.models:8000/v1" } else { "not a url" };
            let selector = selector.map(|s| format!("  workloadSelector: {{matchLabels: {{{s}}}}}\n")).unwrap_or_default();
            format!(
                "apiVersion: bulwark.dev/v1alpha1\nkind: LLMRoute\nmetadata: {{name: route-{n}, namespace: {ns}}}\nspec:\n{selector}  rules:\n  - match: {{models: [\"{model}\"]}}\n    backends:\n    - {{name: stable, url: '{url}', weight: {}}}\n    - {{name: canary, url: 'http://canary.models:8000/v1', weight: {weight}}}{policy}\n",
                10 - weight
            )
        });
    let policy = (0u8..3, ns.clone(), any::<bool>()).prop_map(|(n, ns, valid)| {
        let scanner = if valid { "{type: secrets, action: redact}" } else { "{type: regex, patterns: ['(']}" };
        format!("apiVersion: bulwark.dev/v1alpha1\nkind: ScannerPolicy\nmetadata: {{name: guard-{n}, namespace: {ns}}}\nspec:\n  input:\n  - {scanner}\n")
    });
    let rollout = (0u8..6, ns).prop_map(|(n, ns)| {
        format!(
            "apiVersion: bulwark.dev/v1alpha1\nkind: ModelRollout\nmetadata: {{name: roll-{n}, namespace: {ns}}}\nspec:\n  routeRef: {{name: route-{n}}}\n  stable: {{backend: stable}}\n  canary: {{backend: canary}}\n  steps: [{{weight: 10}}, {{weight: 50}}]\n"
        )
    });
    prop_oneof![4 => route, 2 => policy, 1 => rollout]
}

fn compile_all(docs: &[String], workload: Option<&Workload>) -> bulwark_api::Compiled {
    let (res, errors) = manifest::parse(&docs.join("---\n"), "default");
    assert!(errors.is_empty() && res.duplicates().is_empty(), "{errors:?}");
    compile(&res, workload, &CompileOptions::default())
}

/// The first of each kind, namespace and name, as an API server holds them.
fn unique(docs: Vec<String>) -> Vec<String> {
    let mut seen = std::collections::BTreeSet::new();
    docs.into_iter().filter(|d| seen.insert(d.lines().take(3).collect::<String>())).collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    #[test]
    fn compile_is_deterministic_and_order_independent(
        docs in prop::collection::vec(resource(), 1..14).prop_map(unique).prop_flat_map(|d| (Just(d.clone()), Just(d).prop_shuffle())),
        labels in prop::sample::select(vec!["chat", "bot", "other"]),
    ) {
        let (docs, shuffled) = docs;
        let workload = Workload {
            namespace: "team-a".into(),
            labels: [("app".to_owned(), labels.to_owned())].into(),
        };
        for w in [None, Some(&workload)] {
            let first = compile_all(&docs, w);
            prop_assert_eq!(&first, &compile_all(&docs, w), "the same input compiles the same");
            let other = compile_all(&shuffled, w);
            prop_assert_eq!(&first.config, &other.config, "another order compiles the same config");
            prop_assert_eq!(&first.rejected, &other.rejected, "and rejects the same, in the same order");
        }
    }
}
