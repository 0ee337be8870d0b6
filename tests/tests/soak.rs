//! The short soak: the `bulwark-sidecar` binary under steady load while its config changes
//! every second (`make soak` runs the long one).

use std::time::Duration;

use bulwark_tests::{
    cluster::bin,
    soak::{Options, run},
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_request_fails_while_the_config_changes_under_load() {
    let opts = Options {
        sidecar: bin("bulwark-sidecar").unwrap(),
        rate: 200,
        duration: Duration::from_secs(20),
        change_every: Duration::from_secs(1),
        reload_interval: Duration::from_millis(200),
        warmup: Duration::from_secs(5),
    };
    let report = run(&opts).await.unwrap();
    report.print();
    let problems = report.problems(32 * 1024);
    assert!(problems.is_empty(), "{problems:#?}");
    assert!(report.sent >= 3_000, "only {} requests were sent", report.sent);
    assert!(report.streamed > 0);
    assert!(
        (report.good_changes, report.bad_changes) == (15, 3),
        "{} good, {} bad",
        report.good_changes,
        report.bad_changes
    );
    assert_eq!(report.applied, report.good_changes);
    assert_eq!(report.rejected, report.bad_changes);
}
