//! `make soak`: steady traffic through the sidecar while its config changes (see
//! `bulwark_tests::soak`). Prints what it saw; exits non-zero on any failed request, change not
//! applied or broken file not rejected, or RSS grown past the bound.

use std::{path::PathBuf, time::Duration};

use bulwark_tests::soak::{Options, run};
use clap::Parser;

#[derive(Parser)]
#[command(name = "bulwark-soak", about = "Load through the sidecar while its config changes")]
struct Cli {
    /// Seconds of load.
    #[arg(long, default_value_t = 600)]
    seconds: u64,
    /// Requests per second (open loop; every tenth streamed).
    #[arg(long, default_value_t = 1000)]
    rate: u64,
    /// Seconds between config writes.
    #[arg(long, default_value_t = 3.0)]
    change_every: f64,
    /// Seconds after the start when the RSS baseline is taken.
    #[arg(long, default_value_t = 30.0)]
    warmup: f64,
    /// Most RSS growth allowed after the warm-up, in MB.
    #[arg(long, default_value_t = 16.0)]
    max_rss_growth_mb: f64,
    /// Directory holding the `bulwark-sidecar` binary.
    #[arg(long, default_value = "target/release")]
    bin: PathBuf,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let opts = Options {
        sidecar: cli.bin.join("bulwark-sidecar"),
        rate: cli.rate,
        duration: Duration::from_secs(cli.seconds),
        change_every: Duration::from_secs_f64(cli.change_every),
        reload_interval: Duration::from_secs(1),
        warmup: Duration::from_secs_f64(cli.warmup),
    };
    anyhow::ensure!(opts.sidecar.exists(), "{} is not built", opts.sidecar.display());
    println!(
        "bulwark-soak: {} req/s for {} s through {}, a config change every {} s",
        cli.rate,
        cli.seconds,
        opts.sidecar.display(),
        cli.change_every
    );
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let report = rt.block_on(run(&opts))?;
    report.print();
    let problems = report.problems((cli.max_rss_growth_mb * 1024.0) as u64);
    if problems.is_empty() {
        println!("soak passed");
        return Ok(());
    }
    for p in &problems {
        eprintln!("soak failed: {p}");
    }
    std::process::exit(1)
}
