//! Table-driven tests of `compile()`: resources in, config and rejections out.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use bulwark_api::{
    CompileOptions, Compiled, Workload, compile,
    config::CredentialSource,
    manifest::{self, Resources},
    route::LoadBalancing,
};

fn parse(yaml: &str) -> Resources {
    let (res, errors) = manifest::parse(yaml, "default");
    assert!(errors.is_empty(), "{errors:?}");
    res
}

fn standalone(yaml: &str) -> Compiled {
    compile(&parse(yaml), None, &CompileOptions::default())
}

const OK_ROUTE: &str = r#"
apiVersion: bulwark.dev/v1alpha1
kind: LLMRoute
metadata: {name: chat, namespace: team-a}
spec:
  backends:
    - {name: claude, provider: anthropic, url: https://api.anthropic.com/v1, model: claude-3-5-haiku-latest,
       credentials: {secretKeyRef: {name: anthropic, key: api-key}}}
  rules:
    - match: {paths: [/v1/chat/completions], models: ["gpt-4o*"]}
      backends:
        - {name: openai, url: https://api.openai.com/v1/, model: gpt-4o-mini, weight: 90, credentials: {env: OPENAI_API_KEY}}
        - {name: local, provider: openai-compatible, url: http://vllm.models:8000/v1, weight: 10}
      fallback: [{backend: claude}]
      retry: {attempts: 2, backoff: {base: 100ms, max: 2s}, retryOn: [connect-failure, "5xx"]}
      timeouts: {request: 120s, firstToken: 15s}
"#;

#[test]
fn a_valid_route_compiles_into_one_self_contained_rule() {
    let out = standalone(OK_ROUTE);
    assert!(out.rejected.is_empty(), "{:?}", out.rejected);
    let c = &out.config;
    assert_eq!(c.routes.len(), 1);
    let r = &c.routes[0];
    assert_eq!(r.id, "team-a/chat/0");
    assert_eq!(r.route, "team-a/chat");
    assert_eq!(
        r.backends.iter().map(|b| (b.name.as_str(), b.weight)).collect::<Vec<_>>(),
        [("openai", 90), ("local", 10)]
    );
    assert_eq!(r.backends[0].url, "https://api.openai.com/v1", "trailing slash trimmed");
    assert_eq!(r.backends[0].credential, Some(CredentialSource::Env { name: "OPENAI_API_KEY".into() }));
    assert_eq!(r.fallback[0].name, "claude");
    assert_eq!(
        r.fallback[0].credential,
        Some(CredentialSource::File { path: "/var/run/secrets/bulwark/anthropic/api-key".into() })
    );
    assert_eq!(r.timeouts.request.to_string(), "2m");
    assert_eq!(r.timeouts.idle.to_string(), "1m", "default");
    assert_eq!(c.version.len(), 16);
    // Same input, same version; the config never holds a secret value.
    assert_eq!(standalone(OK_ROUTE).config.version, c.version);
    assert!(!serde_json::to_string(c).unwrap().contains("sk-"));
}

#[test]
fn invalid_resources_are_rejected_with_exact_errors() {
    let route =
        |spec: &str| format!("apiVersion: bulwark.dev/v1alpha1\nkind: LLMRoute\nmetadata: {{name: r}}\nspec:\n{spec}");
    let cases: &[(&str, String, &str)] = &[
        ("no rules", route("  rules: []"), "spec.rules: an LLMRoute needs at least one rule"),
        (
            "bad url",
            route("  rules: [{backends: [{name: a, url: 'ftp://x'}]}]"),
            "spec.rules[0].backends[0].url: \"ftp://x\" is not an http:// or https:// URL",
        ),
        (
            "unknown fallback",
            route("  rules: [{backends: [{name: a, url: 'http://x'}], fallback: [{backend: b}]}]"),
            "spec.rules[0].fallback[0].backend: no backend named \"b\"; define it in spec.backends or in a rule's backends",
        ),
        (
            "zero weights",
            route("  rules: [{backends: [{name: a, url: 'http://x', weight: 0}]}]"),
            "spec.rules[0].backends: all weights are 0; give at least one backend a weight above 0",
        ),
        (
            "two credentials",
            route("  rules: [{backends: [{name: a, url: 'http://x', credentials: {env: A, file: /k}}]}]"),
            "spec.rules[0].backends[0].credentials: set exactly one of secretKeyRef, env or file",
        ),
        (
            "a Secret key climbing out of its directory",
            route(
                "  rules: [{backends: [{name: a, url: 'http://x', credentials: {secretKeyRef: {name: openai, key: ../../token}}}]}]",
            ),
            "spec.rules[0].backends[0].credentials.secretKeyRef.key: \"../../token\" is not a Secret key: letters, digits, '-', '_' and '.' only, and not '.' or '..'",
        ),
        (
            "a Secret name that is a path",
            route(
                "  rules: [{backends: [{name: a, url: 'http://x', credentials: {secretKeyRef: {name: ../etc, key: k}}}]}]",
            ),
            "spec.rules[0].backends[0].credentials.secretKeyRef.name: \"../etc\" is not a Secret name (a DNS subdomain: lowercase letters, digits, '-' and '.')",
        ),
        (
            "azure without deployment",
            route("  rules: [{backends: [{name: a, provider: azure-openai, url: 'https://x.openai.azure.com'}]}]"),
            "spec.rules[0].backends[0].model: azure-openai needs the deployment name in model",
        ),
        (
            "host with a port",
            route(
                "  rules: [{match: {hosts: [api.openai.com, 'API.x.com:443']}, backends: [{name: a, url: 'http://x'}]}]",
            ),
            "spec.rules[0].match.hosts[1]: \"API.x.com:443\" is not a lowercase host name (or *. and one), such as api.openai.com or *.openai.azure.com; no port",
        ),
        (
            "path without slash",
            route("  rules: [{match: {paths: [v1/chat]}, backends: [{name: a, url: 'http://x'}]}]"),
            "spec.rules[0].match.paths[0]: \"v1/chat\" must start with '/', such as /v1/chat/completions",
        ),
        (
            "backoff upside down",
            route("  rules: [{backends: [{name: a, url: 'http://x'}], retry: {backoff: {base: 5s, max: 1s}}}]"),
            "spec.rules[0].retry.backoff: base (5s) is longer than max (1s)",
        ),
        (
            "first token after request",
            route("  rules: [{backends: [{name: a, url: 'http://x'}], timeouts: {request: 10s, firstToken: 30s}}]"),
            "spec.rules[0].timeouts.firstToken: (30s) is longer than the request timeout (10s)",
        ),
        (
            "same name twice",
            route(
                "  rules: [{match: {models: [a]}, backends: [{name: a, url: 'http://x'}]}, {backends: [{name: a, url: 'http://y'}]}]",
            ),
            "spec.rules[1].backends[0].name: backend \"a\" is already defined differently at spec.rules[0].backends[0]; give it another name",
        ),
        (
            "duplicate rule",
            route(
                "  rules: [{match: {models: [a]}, backends: [{name: a, url: 'http://x'}]}, {match: {models: [a]}, backends: [{name: a, url: 'http://x'}]}]",
            ),
            "spec.rules[1]: has the same match as spec.rules[0] and would never be used",
        ),
        (
            "rate limit without limits",
            route("  rules: [{backends: [{name: a, url: 'http://x'}], rateLimit: {key: {header: x-user}}}]"),
            "spec.rules[0].rateLimit: a rateLimit needs requestsPerMinute or tokensPerMinute",
        ),
        (
            "missing policy",
            route("  rules: [{backends: [{name: a, url: 'http://x'}], scannerPolicyRef: {name: guard}}]"),
            "spec.rules[0].scannerPolicyRef: no valid ScannerPolicy \"guard\" in namespace \"default\"",
        ),
        (
            "bad selector",
            route(
                "  workloadSelector: {matchExpressions: [{key: app, operator: In}]}\n  rules: [{backends: [{name: a, url: 'http://x'}]}]",
            ),
            "spec.workloadSelector: matchExpressions[0]: operator In needs at least one value",
        ),
    ];
    for (name, yaml, want) in cases {
        let out = standalone(yaml);
        assert!(out.config.routes.is_empty(), "{name}: an invalid route must not be compiled");
        let got: Vec<_> = out.rejected.iter().map(|r| r.message.as_str()).collect();
        assert_eq!(got, [*want], "{name}");
    }
}

#[test]
fn invalid_policies_and_rollouts_are_rejected_with_exact_errors() {
    let policy = |spec: &str| {
        format!("apiVersion: bulwark.dev/v1alpha1\nkind: ScannerPolicy\nmetadata: {{name: p}}\nspec:\n{spec}")
    };
    let rollout = |spec: &str| {
        format!(
            "apiVersion: bulwark.dev/v1alpha1\nkind: ModelRollout\nmetadata: {{name: ro}}\nspec:\n  routeRef: {{name: chat}}\n{spec}"
        )
    };
    let cases: &[(&str, String, &str)] = &[
        (
            "bad regex",
            policy("  input: [{type: regex, patterns: ['(unclosed']}]"),
            "spec.input[0].patterns[0]: \"(unclosed\" is not a valid regex: error: unclosed group",
        ),
        (
            "regex without patterns",
            policy("  input: [{type: regex}]"),
            "spec.input[0].patterns: a regex scanner needs at least one pattern",
        ),
        (
            "threshold on regex",
            policy("  input: [{type: secrets, threshold: 0.5}]"),
            "spec.input[0].threshold: Secrets does not score; remove threshold",
        ),
        (
            "threshold out of range",
            policy("  input: [{type: promptInjection, threshold: 1.5}]"),
            "spec.input[0].threshold: must be between 0 and 1",
        ),
        (
            "sampling zero",
            policy("  input: [{type: secrets, sampling: 0}]"),
            "spec.input[0].sampling: must be in (0, 1]: the fraction of requests scanned",
        ),
        (
            "redact injection",
            policy("  input: [{type: promptInjection, action: redact}]"),
            "spec.input[0].action: PromptInjection cannot redact; use block or audit",
        ),
        (
            "webhook without one",
            policy("  input: [{type: webhook}]"),
            "spec.input[0].webhook: a webhook scanner needs webhook.url",
        ),
        (
            "webhook url",
            policy("  input: [{type: webhook, webhook: {url: 'ftp://x'}}]"),
            "spec.input[0].webhook.url: \"ftp://x\" is not an http:// or https:// URL",
        ),
        (
            "webhook on secrets",
            policy("  input: [{type: secrets, webhook: {url: 'http://x'}}]"),
            "spec.input[0].webhook: Secrets calls no webhook",
        ),
        (
            "webhook redact",
            policy("  input: [{type: webhook, action: redact, webhook: {url: 'http://x'}}]"),
            "spec.input[0].action: a webhook scanner follows the service's verdict (pass, redact or block): leave action unset, or set audit to only log it",
        ),
        (
            "webhook half a certificate",
            policy("  input: [{type: webhook, webhook: {url: 'https://x', clientCertificate: {certFile: /c}}}]"),
            "spec.input[0].webhook.clientCertificate: set secretName, or both certFile and keyFile",
        ),
        (
            "webhook token",
            policy("  input: [{type: webhook, webhook: {url: 'https://x', bearerToken: {env: A, file: /b}}}]"),
            "spec.input[0].webhook.bearerToken: set exactly one of secretKeyRef, env or file",
        ),
        (
            "model key",
            policy("  input: [{type: banTopics, topics: [x], model: {path: /m, publicKey: bm90IGEga2V5}}]"),
            "spec.input[0].model.publicKey: not an ed25519 public key",
        ),
        (
            "sources on output",
            policy("  output: [{type: promptInjection, sources: [tool]}]"),
            "spec.output[0].sources: only input promptInjection scanners score texts by their source",
        ),
        (
            "sources on banTopics",
            policy("  input: [{type: banTopics, topics: [x], sources: [user]}]"),
            "spec.input[0].sources: only input promptInjection scanners score texts by their source",
        ),
        (
            "threshold of a source not scored",
            policy("  input: [{type: promptInjection, sources: [user], sourceThresholds: {tool: 0.3}}]"),
            "spec.input[0].sourceThresholds.tool: tool is not among the sources scored; add it to sources",
        ),
        (
            "source threshold out of range",
            policy("  input: [{type: promptInjection, sourceThresholds: {document: 2}}]"),
            "spec.input[0].sourceThresholds.document: must be between 0 and 1",
        ),
        (
            "unknown pii",
            policy("  input: [{type: pii, entities: [passport]}]"),
            "spec.input[0].entities[0]: unknown entity \"passport\"; use email, phone, creditCard, iban, ssn, ipAddress",
        ),
        (
            "token limit",
            policy("  input: [{type: tokenLimit, maxTokens: 10, encoding: p50k}]"),
            "spec.input[0].encoding: unknown encoding \"p50k\"; use cl100k_base or o200k_base",
        ),
        (
            "same backends",
            rollout("  stable: {backend: a}\n  canary: {backend: a}\n  steps: [{weight: 10}]"),
            "spec.canary.backend: stable and canary must be different backends",
        ),
        (
            "weight over 100",
            rollout("  stable: {backend: a}\n  canary: {backend: b}\n  steps: [{weight: 120}]"),
            "spec.steps[0].weight: is a percentage: 0 to 100",
        ),
        (
            "canary without steps",
            rollout("  stable: {backend: a}\n  canary: {backend: b}"),
            "spec.steps: a canary rollout needs at least one step",
        ),
        (
            "blue-green with steps",
            rollout("  stable: {backend: a}\n  canary: {backend: b}\n  strategy: blueGreen\n  steps: [{weight: 10}]"),
            "spec.steps: a blueGreen rollout takes no steps: it previews (see preview), then switches at once",
        ),
        (
            "preview on a canary",
            rollout("  stable: {backend: a}\n  canary: {backend: b}\n  steps: [{weight: 10}]\n  preview: {pause: 1m}"),
            "spec.preview: applies to the blueGreen strategy only; use steps for a canary",
        ),
        (
            "bad preview header",
            rollout(
                "  stable: {backend: a}\n  canary: {backend: b}\n  strategy: blueGreen\n  preview: {header: 'x preview'}",
            ),
            "spec.preview.header: \"x preview\" is not a valid header name",
        ),
        (
            "mirror over 100",
            rollout(
                "  stable: {backend: a}\n  canary: {backend: b}\n  steps: [{weight: 0, mirror: 150}, {weight: 100}]",
            ),
            "spec.steps[0].mirror: is a percentage: 0 to 100",
        ),
        (
            "rate out of range",
            rollout(
                "  stable: {backend: a}\n  canary: {backend: b}\n  steps: [{weight: 10}]\n  analysis: {maxBlockRate: 2}",
            ),
            "spec.analysis.maxBlockRate: must be between 0 and 1",
        ),
        (
            "no failures allowed",
            rollout(
                "  stable: {backend: a}\n  canary: {backend: b}\n  steps: [{weight: 10}]\n  analysis: {failureLimit: 0}",
            ),
            "spec.analysis.failureLimit: must be at least 1",
        ),
        (
            "unknown prometheus signal",
            rollout(
                "  stable: {backend: a}\n  canary: {backend: b}\n  steps: [{weight: 10}]\n  analysis: {prometheus: {address: 'http://p:9090', queries: {errors: 'x'}}}",
            ),
            "spec.analysis.prometheus.queries.errors: unknown signal; use requests, errorRate, p95Latency, p95FirstToken, blockRate",
        ),
        (
            "prometheus without http",
            rollout(
                "  stable: {backend: a}\n  canary: {backend: b}\n  steps: [{weight: 10}]\n  analysis: {prometheus: {address: 'p:9090', queries: {errorRate: 'x'}}}",
            ),
            "spec.analysis.prometheus.address: \"p:9090\" is not an http(s) URL",
        ),
        (
            "pause on the last step",
            rollout(
                "  stable: {backend: a}\n  canary: {backend: b}\n  steps: [{weight: 10, pause: 1m}, {weight: 100, pause: 1m}]",
            ),
            "spec.steps[1].pause: the last step completes the rollout at once, so it holds no pause and mirrors nothing; add a step after it",
        ),
        (
            "no route",
            rollout("  stable: {backend: a}\n  canary: {backend: b}\n  steps: [{weight: 10}]"),
            "no valid LLMRoute \"chat\" in namespace \"default\"",
        ),
    ];
    for (name, yaml, want) in cases {
        let out = standalone(yaml);
        let got: Vec<_> = out.rejected.iter().map(|r| r.message.as_str()).collect();
        assert_eq!(got, [*want], "{name}");
    }
}

#[test]
fn parse_errors_name_the_document_and_field() {
    let cases = [
        (
            "apiVersion: bulwark.dev/v1alpha1\nkind: LLMRoute\nmetadata: {name: r}\nspec: {rules: [{backends: [{name: a, url: 'http://x', weight: -1}]}]}",
            "document 1 (LLMRoute r): spec.rules[0].backends[0].weight: invalid value: integer `-1`, expected u32",
        ),
        (
            "apiVersion: bulwark.dev/v1alpha1\nkind: LLMRoute\nmetadata: {name: r}\nspec: {rules: [{timeouts: {request: 10x}}]}",
            "document 1 (LLMRoute r): spec.rules[0].timeouts.request: invalid duration \"10x\": write a number followed by ms, s, m or h, such as 250ms, 2s, 10m or 1h30m",
        ),
        (
            "apiVersion: bulwark.dev/v1alpha1\nkind: LLMRoute\nmetadata: {name: r}\nspec: {rulez: []}",
            "document 1 (LLMRoute r): spec.rulez: unknown field `rulez`, expected one of `workloadSelector`, `backends`, `rules`",
        ),
        (
            "apiVersion: v1\nkind: Secret\nmetadata: {name: s}\n---\napiVersion: bulwark.dev/v1beta9\nkind: LLMRoute\nmetadata: {name: r}",
            "document 2 (LLMRoute r): unsupported apiVersion \"bulwark.dev/v1beta9\"; this version reads bulwark.dev/v1alpha1",
        ),
        (
            "apiVersion: bulwark.dev/v1alpha1\nkind: LLMRouter\nmetadata: {name: r}",
            "document 1 (LLMRouter r): unknown kind \"LLMRouter\"; use LLMRoute, ScannerPolicy, ModelRollout or ModelServer",
        ),
        (
            "key: [unclosed",
            "document 1: not valid YAML: did not find expected ',' or ']' at line 2 column 1, while parsing a flow sequence at line 1 column 6",
        ),
    ];
    for (yaml, want) in cases {
        let (_, errors) = manifest::parse(yaml, "default");
        assert_eq!(errors.iter().map(ToString::to_string).collect::<Vec<_>>(), [want]);
    }
}

#[test]
fn an_invalid_route_never_breaks_the_others_and_conflicts_go_to_the_newer() {
    let yaml = r#"
apiVersion: bulwark.dev/v1alpha1
kind: LLMRoute
metadata: {name: a-first, creationTimestamp: "2026-01-01T00:00:00Z"}
spec: {rules: [{match: {models: [m]}, backends: [{name: x, url: 'http://x'}]}]}
---
apiVersion: bulwark.dev/v1alpha1
kind: LLMRoute
metadata: {name: 0-second, creationTimestamp: "2026-02-01T00:00:00Z"}
spec: {rules: [{match: {models: [m]}, backends: [{name: y, url: 'http://y'}]}]}
---
apiVersion: bulwark.dev/v1alpha1
kind: LLMRoute
metadata: {name: broken}
spec: {rules: [{backends: [{name: z, url: 'nope'}]}]}
"#;
    let out = standalone(yaml);
    assert_eq!(out.config.routes.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(), ["default/a-first/0"]);
    let got: Vec<_> = out.rejected.iter().map(|r| (r.name.as_str(), r.reason)).collect();
    assert_eq!(got, [("0-second", "Conflict"), ("broken", "Invalid")]);
}

#[test]
fn rules_are_ordered_most_specific_first() {
    let yaml = r#"
apiVersion: bulwark.dev/v1alpha1
kind: LLMRoute
metadata: {name: r}
spec:
  backends: [{name: x, url: 'http://x'}]
  rules:
    - {name: catch-all, backends: [{name: x, url: 'http://x'}]}
    - {name: path, match: {paths: [/v1/messages]}, fallback: [{backend: x}]}
    - {name: glob, match: {models: ["gpt-*"]}, fallback: [{backend: x}]}
    - {name: gold, match: {models: ["gpt-*"], headers: {x-tier: gold}}, fallback: [{backend: x}]}
    - {name: exact, match: {models: [gpt-4o]}, fallback: [{backend: x}]}
"#;
    let out = standalone(yaml);
    let ids: Vec<_> = out.config.routes.iter().map(|r| r.id.rsplit('/').next().unwrap()).collect();
    assert_eq!(ids, ["exact", "gold", "glob", "path", "catch-all"]);
}

#[test]
fn workload_selection_by_namespace_and_labels() {
    let yaml = r#"
apiVersion: bulwark.dev/v1alpha1
kind: LLMRoute
metadata: {name: bots, namespace: team-a}
spec: {workloadSelector: {matchLabels: {app: bot}}, rules: [{match: {models: [a]}, backends: [{name: x, url: 'http://x'}]}]}
---
apiVersion: bulwark.dev/v1alpha1
kind: LLMRoute
metadata: {name: everyone, namespace: team-a}
spec: {rules: [{backends: [{name: x, url: 'http://x'}]}]}
---
apiVersion: bulwark.dev/v1alpha1
kind: LLMRoute
metadata: {name: elsewhere, namespace: team-b}
spec: {rules: [{backends: [{name: x, url: 'http://x'}]}]}
"#;
    let res = parse(yaml);
    let ids = |labels: &[(&str, &str)]| {
        let w = Workload {
            namespace: "team-a".into(),
            labels: labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        };
        compile(&res, Some(&w), &CompileOptions::default())
            .config
            .routes
            .into_iter()
            .map(|r| r.route)
            .collect::<Vec<_>>()
    };
    assert_eq!(ids(&[("app", "bot")]), ["team-a/bots", "team-a/everyone"]);
    assert_eq!(ids(&[("app", "web")]), ["team-a/everyone"]);
}

#[test]
fn a_rollout_sets_the_stable_canary_split_from_its_status() {
    let yaml = r#"
apiVersion: bulwark.dev/v1alpha1
kind: LLMRoute
metadata: {name: chat}
spec:
  backends: [{name: canary, url: 'http://canary'}]
  rules: [{backends: [{name: stable, url: 'http://stable', weight: 7}]}]
---
apiVersion: bulwark.dev/v1alpha1
kind: ModelRollout
metadata: {name: upgrade}
spec:
  routeRef: {name: chat}
  stable: {backend: stable}
  canary: {backend: canary}
  steps: [{weight: 25, pause: 5m}, {weight: 100}]
status: {phase: Progressing, currentStep: 0, canaryWeight: 25}
"#;
    let out = standalone(yaml);
    assert!(out.rejected.is_empty(), "{:?}", out.rejected);
    let w: Vec<_> = out.config.routes[0].backends.iter().map(|b| (b.name.as_str(), b.weight)).collect();
    assert_eq!(w, [("stable", 75), ("canary", 25)]);
    let least_loaded = yaml.replace("rules: [{backends:", "rules: [{loadBalancing: leastLoaded, backends:");
    let out = standalone(&least_loaded);
    assert_eq!(out.config.routes[0].load_balancing, LoadBalancing::Weighted, "the split is the rollout's, exactly");
    let no_rollout = least_loaded.split("---").next().unwrap();
    assert_eq!(standalone(no_rollout).config.routes[0].load_balancing, LoadBalancing::LeastLoaded);
    let missing = yaml.replace("canary: {backend: canary}", "canary: {backend: nope}");
    let out = standalone(&missing);
    assert_eq!(out.rejected[0].message, "backend \"nope\" is not defined in LLMRoute \"chat\"");
    assert_eq!(out.config.routes[0].backends.len(), 1, "the route keeps serving unchanged");
}

#[test]
fn a_running_step_mirrors_and_a_blue_green_preview_routes_by_header() {
    let route = r#"
apiVersion: bulwark.dev/v1alpha1
kind: LLMRoute
metadata: {name: chat}
spec:
  backends: [{name: canary, url: 'http://canary'}]
  rules: [{match: {models: [m]}, backends: [{name: stable, url: 'http://stable'}]}]
---
"#;
    let canary = format!(
        "{route}apiVersion: bulwark.dev/v1alpha1\nkind: ModelRollout\nmetadata: {{name: up}}\nspec:\n  routeRef: {{name: chat}}\n  stable: {{backend: stable}}\n  canary: {{backend: canary}}\n  steps: [{{weight: 0, mirror: 20, pause: 1m}}, {{weight: 100}}]\nstatus: {{phase: Progressing, currentStep: 0, canaryWeight: 0}}\n"
    );
    let out = standalone(&canary);
    assert!(out.rejected.is_empty(), "{:?}", out.rejected);
    let r = &out.config.routes[0];
    let m = r.mirror.as_ref().expect("the step mirrors");
    assert_eq!((m.backend.name.as_str(), m.percent), ("canary", 20));
    assert_eq!(
        r.backends.iter().map(|b| (b.name.as_str(), b.weight)).collect::<Vec<_>>(),
        [("stable", 100), ("canary", 0)]
    );
    let rolled_back = canary.replace("phase: Progressing", "phase: RolledBack");
    assert_eq!(standalone(&rolled_back).config.routes[0].mirror, None, "a stopped rollout mirrors nothing");

    let blue_green = format!(
        "{route}apiVersion: bulwark.dev/v1alpha1\nkind: ModelRollout\nmetadata: {{name: up}}\nspec:\n  routeRef: {{name: chat}}\n  stable: {{backend: stable}}\n  canary: {{backend: canary}}\n  strategy: blueGreen\nstatus: {{phase: Progressing, currentStep: 0, canaryWeight: 0}}\n"
    );
    let out = standalone(&blue_green);
    let summary: Vec<_> = out
        .config
        .routes
        .iter()
        .map(|r| {
            (
                r.id.as_str(),
                r.matches.headers.clone(),
                r.backends.iter().map(|b| (b.name.clone(), b.weight)).collect::<Vec<_>>(),
            )
        })
        .collect();
    let preview = [("x-bulwark-preview".to_owned(), "true".to_owned())].into();
    assert_eq!(
        summary,
        [
            ("default/chat/0~preview", preview, vec![("canary".to_owned(), 1)]),
            ("default/chat/0", Default::default(), vec![("stable".to_owned(), 100), ("canary".to_owned(), 0)]),
        ],
        "the preview rule is more specific, so it is tried first"
    );
    let switched = blue_green.replace("currentStep: 0, canaryWeight: 0", "currentStep: 1, canaryWeight: 100");
    assert_eq!(standalone(&switched).config.routes.len(), 1, "after the switch there is no preview");
}

#[test]
fn only_referenced_policies_travel_with_the_config() {
    let yaml = r#"
apiVersion: bulwark.dev/v1alpha1
kind: ScannerPolicy
metadata: {name: guard}
spec: {input: [{type: secrets, action: redact}]}
---
apiVersion: bulwark.dev/v1alpha1
kind: ScannerPolicy
metadata: {name: unused}
spec: {}
---
apiVersion: bulwark.dev/v1alpha1
kind: LLMRoute
metadata: {name: chat}
spec: {rules: [{backends: [{name: x, url: 'http://x'}], scannerPolicyRef: {name: guard}}]}
"#;
    let out = standalone(yaml);
    assert_eq!(out.config.scanner_policies.keys().collect::<Vec<_>>(), ["default/guard"]);
    assert_eq!(out.config.routes[0].scanner_policy.as_deref(), Some("default/guard"));
}

#[test]
fn committed_crd_yaml_matches_the_types() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    for dir in ["crds/yaml", "charts/bulwark/crds"] {
        for (file, yaml) in bulwark_api::crds() {
            let committed = std::fs::read_to_string(root.join(dir).join(file)).unwrap_or_default();
            assert!(committed == yaml, "{dir}/{file} is stale: run `make crds`");
        }
    }
}

#[test]
fn every_example_loads_and_compiles_cleanly() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
    let mut files = 0;
    let mut stack = vec![root];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            // Argo CD's Applications: checked against Argo CD's schema by scripts/argocd-check.sh.
            if path.is_dir() && !path.ends_with("argocd") {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "yaml" || e == "yml") {
                let (res, errors) = manifest::parse(&std::fs::read_to_string(&path).unwrap(), "default");
                assert!(errors.is_empty(), "{}: {errors:?}", path.display());
                let out = compile(&res, None, &CompileOptions::default());
                assert!(out.rejected.is_empty(), "{}: {:?}", path.display(), out.rejected);
                files += 1;
            }
        }
    }
    assert!(files >= 2, "examples/ holds the quickstart and the reference examples");
}

const SERVER: &str = r#"
apiVersion: bulwark.dev/v1alpha1
kind: ModelServer
metadata: {name: llama, namespace: team-a}
spec:
  image: vllm/vllm-openai:v0.11.0
  port: 8000
"#;

fn served(route_backend: &str) -> String {
    format!(
        "{SERVER}---\napiVersion: bulwark.dev/v1alpha1\nkind: LLMRoute\nmetadata: {{name: chat, namespace: team-a}}\nspec:\n  rules: [{{backends: [{route_backend}]}}]\n"
    )
}

#[test]
fn a_backend_names_a_model_server_and_reaches_its_ready_replicas() {
    let mut res = parse(&served("{name: local, modelServerRef: {name: llama}}"));
    let out = compile(&res, None, &CompileOptions::default());
    assert!(out.rejected.is_empty(), "{:?}", out.rejected);
    let b = &out.config.routes[0].backends[0];
    assert_eq!((b.url.as_str(), b.provider.as_str()), ("http://llama.team-a.svc:8000/v1", "openai-compatible"));
    assert_eq!(b.replicas, None, "no replicas known: the Service");
    res.endpoints.insert(
        ("team-a".into(), "llama".into()),
        vec!["http://10.0.0.9:8000/v1".into(), "http://10.0.0.3:8000/v1".into()],
    );
    let out = compile(&res, None, &CompileOptions::default());
    let r = out.config.routes[0].backends[0].replicas.clone().unwrap();
    assert_eq!(r.endpoints, ["http://10.0.0.3:8000/v1", "http://10.0.0.9:8000/v1"], "sorted, so the version is stable");
    assert_eq!(r.metrics_path.as_deref(), Some("/metrics"));

    let missing =
        compile(&parse(&served("{name: local, modelServerRef: {name: mistral}}")), None, &CompileOptions::default());
    assert!(missing.config.routes.is_empty());
    let why = &missing.rejected[0];
    assert_eq!(
        (why.reason, why.message.as_str()),
        ("ModelServerNotFound", "backend \"local\": no valid ModelServer \"mistral\" in namespace \"team-a\"")
    );
    let both = compile(
        &parse(&served("{name: local, url: 'http://x', modelServerRef: {name: llama}}")),
        None,
        &CompileOptions::default(),
    );
    assert_eq!(both.rejected[0].message, "spec.rules[0].backends[0]: set url or modelServerRef, not both");
}

#[test]
fn invalid_model_servers_are_rejected_with_exact_errors() {
    let server = |spec: &str| SERVER.replace("  port: 8000\n", spec);
    let cases: &[(&str, String, &str)] = &[
        ("no gpus", server("  gpu: {count: 0}\n"), "spec.gpu.count: must be at least 1; remove gpu for a CPU server"),
        (
            "bad mig",
            server("  gpu: {mig: big}\n"),
            "spec.gpu.mig: \"big\" is not a MIG profile like 1g.10gb or 3g.40gb",
        ),
        (
            "mig and memory",
            server("  gpu: {mig: 1g.10gb, minMemoryGiB: 40}\n"),
            "spec.gpu.minMemoryGiB: a MIG profile fixes the memory of its slice; remove minMemoryGiB",
        ),
        (
            "both counts",
            server("  replicas: 2\n  autoscaling: {maxReplicas: 4, target: 8}\n"),
            "spec.replicas: an autoscaler owns the replica count: set replicas or autoscaling, not both",
        ),
        (
            "bounds",
            server("  autoscaling: {minReplicas: 5, maxReplicas: 4, target: 8}\n"),
            "spec.autoscaling: minReplicas must not exceed maxReplicas, which must be at least 1",
        ),
        (
            "hpa to zero",
            server("  autoscaling: {minReplicas: 0, maxReplicas: 4, target: 8}\n"),
            "spec.autoscaling.minReplicas: a HorizontalPodAutoscaler cannot scale to zero; use engine: keda",
        ),
        (
            "kv over 1",
            server("  autoscaling: {maxReplicas: 4, metric: kvCacheUsage, target: 80}\n"),
            "spec.autoscaling.target: KV-cache use is a fraction: 0 to 1",
        ),
        (
            "keda fields on hpa",
            server("  autoscaling: {maxReplicas: 4, target: 8, activationTarget: 1}\n"),
            "spec.autoscaling: prometheusAddress and activationTarget apply to engine: keda",
        ),
        ("shm", server("  shmSize: lots\n"), "spec.shmSize: \"lots\" is not a quantity like 2Gi or 512Mi"),
        ("health path", server("  healthPath: health\n"), "spec.healthPath: \"health\" must start with /"),
        (
            "no memory",
            server("  gpu: {minMemoryGiB: 0}\n"),
            "spec.gpu.minMemoryGiB: must be at least 1; leave it out for any memory",
        ),
        ("int32", server("  replicas: 3000000000\n"), "spec.replicas: must be at most 2147483647"),
        (
            "service name",
            SERVER.replace("name: llama", "name: Llama.3"),
            "metadata.name: \"Llama.3\" names its Service: at most 63 lowercase letters, digits and '-', starting with a letter",
        ),
    ];
    for (name, yaml, want) in cases {
        let out = standalone(yaml);
        let got: Vec<_> = out.rejected.iter().map(|r| r.message.as_str()).collect();
        assert_eq!(got, [*want], "{name}");
        assert_eq!(out.rejected[0].kind, "ModelServer");
    }
    let keda =
        server("  autoscaling: {engine: keda, minReplicas: 0, maxReplicas: 4, target: 8, activationTarget: 1}\n");
    assert!(standalone(&keda).rejected.is_empty(), "KEDA scales to zero");
}

#[test]
fn a_resource_defined_twice_is_reported() {
    let route = |ns: &str| {
        format!(
            "apiVersion: bulwark.dev/v1alpha1\nkind: LLMRoute\nmetadata: {{name: chat, namespace: {ns}}}\nspec:\n  rules:\n  - backends: [{{name: a, url: 'http://a:8000/v1'}}]\n"
        )
    };
    let mut res = parse(&route("team-a"));
    res.extend(parse(&route("team-b")));
    assert!(res.duplicates().is_empty(), "the same name in two namespaces is two resources");
    res.extend(parse(&route("team-a")));
    assert_eq!(res.duplicates(), ["LLMRoute team-a/chat"]);
}

#[test]
fn webhook_secrets_become_the_files_they_are_mounted_as() {
    let yaml = format!(
        "{OK_ROUTE}      scannerPolicyRef: {{name: guard}}\n---\napiVersion: bulwark.dev/v1alpha1\nkind: ScannerPolicy\nmetadata: {{name: guard, namespace: team-a}}\nspec:\n  input:\n  - type: webhook\n    webhook: {{url: 'https://guard.svc/check', bearerToken: {{secretKeyRef: {{name: guard, key: token}}}}, clientCertificate: {{secretName: guard-tls}}}}\n"
    );
    let out = standalone(&yaml);
    assert!(out.rejected.is_empty(), "{:?}", out.rejected);
    let hook = out.config.scanner_policies["team-a/guard"].input[0].webhook.clone().unwrap();
    let token = hook.bearer_token.unwrap();
    assert_eq!((token.secret_key_ref, token.file.as_deref()), (None, Some("/var/run/secrets/bulwark/guard/token")));
    let cert = hook.client_certificate.unwrap();
    assert_eq!(cert.cert_file.as_deref(), Some("/var/run/secrets/bulwark/guard-tls/tls.crt"));
    assert_eq!(cert.key_file.as_deref(), Some("/var/run/secrets/bulwark/guard-tls/tls.key"));
    assert_eq!(cert.secret_name, None);
}

#[test]
fn in_a_cluster_credentials_name_only_secrets() {
    let yaml = format!(
        "{OK_ROUTE}---\napiVersion: bulwark.dev/v1alpha1\nkind: ScannerPolicy\nmetadata: {{name: hook, namespace: team-a}}\nspec:\n  input: [{{type: webhook, webhook: {{url: 'https://guard', bearerToken: {{file: /var/run/secrets/kubernetes.io/serviceaccount/token}}, caFile: /etc/ca.crt, clientCertificate: {{certFile: /c, keyFile: /k}}}}}}]\n"
    );
    let res = parse(&yaml);
    assert!(standalone(&yaml).rejected.is_empty(), "a standalone sidecar's directory is its owner's");
    let cluster = CompileOptions { local_credentials: false, ..CompileOptions::default() };
    let out = compile(&res, None, &cluster);
    let said: Vec<String> = out.rejected.iter().map(|r| format!("{} {}: {}", r.kind, r.reason, r.message)).collect();
    let why = "names the sidecar's own environment or files, which a resource in a cluster may not read; name a Secret instead";
    assert_eq!(
        said,
        [
            format!("LLMRoute Invalid: spec.rules[0].backends[0].credentials.env: {why}"),
            format!(
                "ScannerPolicy Invalid: spec.input[0].webhook.bearerToken.file: {why}; spec.input[0].webhook.clientCertificate.certFile: {why}; spec.input[0].webhook.clientCertificate.keyFile: {why}"
            ),
        ]
    );
    assert!(out.config.routes.is_empty());
    let keyed = yaml.replace("credentials: {env: OPENAI_API_KEY}", "credentials: {secretKeyRef: {name: o, key: k}}");
    assert_eq!(compile(&parse(&keyed), None, &cluster).config.routes.len(), 1, "secretKeyRef is taken");
}
