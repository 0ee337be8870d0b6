//! Which backends a request tries, in order: one pick among the rule's backends whose circuit is
//! not open (by weight, or with `leastLoaded` the cheaper of two drawn by weight), then the
//! fallback list. Rollouts drive it through the weights.

use bulwark_api::route::LoadBalancing;

use std::sync::Arc;

use rand::Rng;
use tokio::time::Instant;

use crate::{
    circuit::State,
    replicas,
    request::Api,
    runtime::{BackendRuntime, RouteRuntime},
};

/// The attempt order for one request. Backends that cannot speak `api` are left out.
pub fn plan(route: &RouteRuntime, api: Api, now: Instant, rng: &mut impl Rng) -> Vec<Arc<BackendRuntime>> {
    let usable = |b: &&Arc<BackendRuntime>| b.speaks(api) && b.cfg.weight > 0;
    let closed: Vec<&Arc<BackendRuntime>> =
        route.backends.iter().filter(usable).filter(|b| b.circuit.state(now) != State::Open).collect();
    let mut out = Vec::with_capacity(1 + route.fallback.len());
    let picked = match route.cfg.load_balancing {
        LoadBalancing::Weighted => pick_weighted(&closed, rng),
        // Drawn by weight, compared per unit of weight: a backend of twice the weight takes
        // twice the load before it looks as busy.
        LoadBalancing::LeastLoaded => {
            replicas::p2c(&closed, |b| u64::from(b.cfg.weight), |b| b.cost(now) / f64::from(b.cfg.weight.max(1)), rng)
        }
    };
    if let Some(b) = picked {
        out.push(b.clone());
    }
    for f in route.fallback.iter().filter(|b| b.speaks(api)) {
        if !out.iter().any(|b| b.cfg.name == f.cfg.name) {
            out.push(f.clone());
        }
    }
    out
}

fn pick_weighted<'a>(items: &[&'a Arc<BackendRuntime>], rng: &mut impl Rng) -> Option<&'a Arc<BackendRuntime>> {
    let total: u64 = items.iter().map(|b| u64::from(b.cfg.weight)).sum();
    if total == 0 {
        return None;
    }
    let mut ticket = rng.random_range(0..total);
    for b in items {
        let w = u64::from(b.cfg.weight);
        if ticket < w {
            return Some(b);
        }
        ticket -= w;
    }
    None
}

#[cfg(test)]
mod tests {
    use bulwark_api::{CompileOptions, compile, manifest};
    use rand::{SeedableRng, rngs::StdRng};

    use super::*;
    use crate::runtime::{Runtime, Shared};

    fn runtime(yaml: &str) -> Runtime {
        let (res, _) = manifest::parse(yaml, "default");
        Runtime::build(compile(&res, None, &CompileOptions::default()).config, &Shared::default()).unwrap()
    }

    const ROUTE: &str = r#"
apiVersion: bulwark.dev/v1alpha1
kind: LLMRoute
metadata: {name: r}
spec:
  backends: [{name: claude, provider: anthropic, url: 'http://c'}, {name: backup, url: 'http://b'}]
  rules:
    - backends: [{name: a, url: 'http://a', weight: 90}, {name: b, url: 'http://b2', weight: 10}]
      fallback: [{backend: claude}, {backend: backup}]
      circuitBreaker: {consecutiveFailures: 1}
"#;

    #[test]
    fn weights_split_traffic() {
        let rt = runtime(ROUTE);
        let mut rng = StdRng::seed_from_u64(7);
        let now = Instant::now();
        let mut a = 0;
        for _ in 0..10_000 {
            if plan(&rt.routes[0], Api::ChatCompletions, now, &mut rng)[0].cfg.name == "a" {
                a += 1;
            }
        }
        assert!((8_800..=9_200).contains(&a), "{a} of 10000 went to the 90% backend");
    }

    #[tokio::test(start_paused = true)]
    async fn open_circuits_and_other_protocols_are_skipped() {
        let rt = runtime(ROUTE);
        let route = &rt.routes[0];
        let mut rng = StdRng::seed_from_u64(1);
        let names = |p: Vec<Arc<BackendRuntime>>| p.iter().map(|b| b.cfg.name.clone()).collect::<Vec<_>>();
        route.backends[0].circuit.failure(Instant::now());
        for _ in 0..20 {
            assert_eq!(names(plan(route, Api::ChatCompletions, Instant::now(), &mut rng)), ["b", "backup"]);
        }
        assert_eq!(names(plan(route, Api::Messages, Instant::now(), &mut rng)), ["claude"]);
    }

    #[test]
    fn least_loaded_weighs_load_by_capacity() {
        let rt = runtime(&ROUTE.replace("    - backends:", "    - loadBalancing: leastLoaded\n      backends:"));
        let route = &rt.routes[0];
        let (a, b) = (&route.backends[0], &route.backends[1]);
        let mut rng = StdRng::seed_from_u64(3);
        let now = Instant::now();
        let first = |rng: &mut StdRng| plan(route, Api::ChatCompletions, now, rng)[0].cfg.name.clone();
        // Weight 90 against 10: five in flight on `a` is less load for its weight than one on `b`.
        let _on_a: Vec<_> = (0..5).map(|_| a.endpoints[0].start()).collect();
        let _on_b = b.endpoints[0].start();
        assert!((0..50).all(|_| first(&mut rng) == "a"));
        let _more_on_a: Vec<_> = (0..20).map(|_| a.endpoints[0].start()).collect();
        assert!((0..50).all(|_| first(&mut rng) == "b"), "25 on a is more, for its weight, than 1 on b");
    }
}
