//! `train parity FIXTURE...`: per-tensor errors against reference fixtures.
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use femtochat_engine::Device;
use femtochat_model::parity::{Fixture, is_multi_step, run_on, run_optim_steps};

#[derive(clap::Args)]
pub struct Args {
    /// Fixture files (`<case>.safetensors`, with `<case>.json` beside each).
    #[arg(required = true, value_name = "FIXTURE")]
    fixtures: Vec<PathBuf>,
    /// Print one JSON object per compared tensor instead of a table.
    #[arg(long)]
    json: bool,
    /// Print only the failing comparisons (and a summary per fixture).
    #[arg(long)]
    failures_only: bool,
    /// Run the model on cpu (relative L2 tolerances: 1e-5 outputs, 1e-4 gradients, parameters
    /// and optimizer updates) or gpu (5e-5; 1e-3 for multi-step optimizer updates).
    #[arg(long, default_value = "cpu")]
    device: Device,
}

pub fn main(args: Args) -> anyhow::Result<ExitCode> {
    let mut all_ok = true;
    for path in &args.fixtures {
        let fx =
            Fixture::load(path).with_context(|| format!("loading fixture {}", path.display()))?;
        let checks = if is_multi_step(&fx) {
            run_optim_steps(&fx, args.device)
        } else {
            run_on(&fx, args.device)
        };
        let checks = checks
            .with_context(|| format!("running fixture {} on {}", path.display(), args.device))?;
        let failed = checks.iter().filter(|c| !c.ok()).count();
        all_ok &= failed == 0;
        for c in checks.iter().filter(|c| !args.failures_only || !c.ok()) {
            if args.json {
                let line = serde_json::json!({
                    "fixture": fx.name, "tensor": c.what, "rel_err": c.rel_err, "tol": c.tol, "ok": c.ok(),
                });
                println!("{line}");
            } else {
                let mark = if c.ok() { "ok  " } else { "FAIL" };
                println!(
                    "{mark} {:<12} {:<48} {:.3e} (tol {:.0e})",
                    fx.name, c.what, c.rel_err, c.tol
                );
            }
        }
        if !args.json {
            let worst = checks.iter().map(|c| c.rel_err / c.tol).fold(0.0, f64::max);
            println!(
                "{}: {} checks, {} failed, worst error at {:.1}% of its tolerance",
                fx.name,
                checks.len(),
                failed,
                worst * 100.0
            );
        }
    }
    Ok(if all_ok { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}
