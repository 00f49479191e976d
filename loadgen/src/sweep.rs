//! Sweep: raise the open-loop rate in steps until the objective breaks; the capacity is
//! the highest rate that met it.

use std::fmt::Write as _;
use std::path::Path;

use serde::Serialize;

use crate::report::{Percentiles, RunReport};
use crate::run::{run_once, step_dir, RunError, RunState, Target};
use crate::scenario::{Mode, Scenario};
use crate::CpuPicker;

/// One step of a sweep.
#[derive(Debug, Clone, Serialize)]
pub struct SweepStep {
    /// Target rate, invoices/s.
    pub target_invoices_per_s: f64,
    /// Achieved, invoices/s.
    pub achieved_invoices_per_s: f64,
    /// Request latency.
    pub latency: Percentiles,
    /// Errors in the measured window.
    pub errors_total: u64,
    /// Objective met.
    pub met: bool,
    /// Why not.
    pub failures: Vec<String>,
}

/// A sweep's result.
#[derive(Debug, Clone, Serialize)]
pub struct SweepReport {
    /// Highest target rate that met the objective (None: not even the first step).
    pub capacity_invoices_per_s: Option<f64>,
    /// The first rate that broke it (None: no step broke it up to `max_rate`).
    pub broke_at_invoices_per_s: Option<f64>,
    /// The step size: the capacity is known to within it.
    pub step_invoices_per_s: f64,
    /// The objective.
    pub objective: crate::scenario::Objective,
    /// Every step run, in order.
    pub steps: Vec<SweepStep>,
}

impl SweepReport {
    /// The human-readable summary.
    pub fn text(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "== sweep (open loop; objective p99 ≤ {} ms, errors ≤ {}, achieved ≥ {:.0}%)",
            self.objective.p99_ms,
            self.objective.errors_max,
            100.0 * self.objective.achieved_min_ratio
        );
        let _ = writeln!(
            s,
            "{:>12} {:>12} {:>10} {:>10} {:>10} {:>10} {:>8}  verdict",
            "target/s", "achieved/s", "p50 ms", "p99 ms", "p99.9 ms", "max ms", "errors"
        );
        for step in &self.steps {
            let _ = writeln!(
                s,
                "{:>12.0} {:>12.0} {:>10.3} {:>10.3} {:>10.3} {:>10.3} {:>8}  {}",
                step.target_invoices_per_s,
                step.achieved_invoices_per_s,
                step.latency.p50_us / 1e3,
                step.latency.p99_us / 1e3,
                step.latency.p999_us / 1e3,
                step.latency.max_us / 1e3,
                step.errors_total,
                if step.met {
                    "met".to_owned()
                } else {
                    format!("BROKEN: {}", step.failures.join("; "))
                }
            );
        }
        match (self.capacity_invoices_per_s, self.broke_at_invoices_per_s) {
            (Some(c), Some(b)) => {
                let _ = writeln!(s, "capacity: {c:.0} invoices/s (objective broke at {b:.0})");
            }
            (Some(c), None) => {
                let _ = writeln!(
                    s,
                    "capacity: at least {c:.0} invoices/s (objective held at every step)"
                );
            }
            (None, _) => {
                let _ = writeln!(s, "capacity: below the first step");
            }
        }
        s
    }
}

/// Runs the sweep; step reports go to `out/step-NN-RATE/`, the sweep's own to
/// `out/sweep.json` and `out/sweep.svg`. `on_step` sees each step's report as it ends.
pub fn sweep(
    rt: &tokio::runtime::Runtime,
    target: &Target,
    scenario: &Scenario,
    out: Option<&Path>,
    cpus: &CpuPicker,
    mut on_step: impl FnMut(&RunReport),
) -> Result<SweepReport, RunError> {
    let mut scenario = scenario.clone();
    scenario.mode = Mode::Open;
    let mut state = RunState::new(&scenario, target);
    let mut steps = Vec::new();
    let mut capacity = None;
    let mut broke = None;
    let cfg = scenario.sweep.clone();
    let mut index = 0;
    loop {
        let rate = cfg.start_rate + index as f64 * cfg.step_rate;
        if rate > cfg.max_rate * (1.0 + 1e-9) {
            break;
        }
        let dir = out.map(|o| step_dir(o, index, rate));
        let output = run_once(
            rt,
            target,
            &scenario,
            rate,
            &mut state,
            dir.as_deref(),
            cpus,
        )?;
        let report = output.report;
        on_step(&report);
        steps.push(SweepStep {
            target_invoices_per_s: rate,
            achieved_invoices_per_s: report.achieved_invoices_per_s,
            latency: report.latency.clone(),
            errors_total: report.errors_total,
            met: report.verdict.met,
            failures: report.verdict.failures.clone(),
        });
        if report.verdict.met {
            capacity = Some(rate);
        } else {
            broke = Some(rate);
            break;
        }
        index += 1;
    }
    let report = SweepReport {
        capacity_invoices_per_s: capacity,
        broke_at_invoices_per_s: broke,
        step_invoices_per_s: cfg.step_rate,
        objective: scenario.objective.clone(),
        steps,
    };
    if let Some(out) = out {
        std::fs::create_dir_all(out)?;
        let text = serde_json::to_string_pretty(&report).map_err(std::io::Error::other)?;
        std::fs::write(out.join("sweep.json"), text + "\n")?;
        crate::plot::sweep(
            &out.join("sweep.svg"),
            &report.steps,
            scenario.objective.p99_ms,
        )
        .map_err(|e| RunError::Config(format!("plot: {e}")))?;
    }
    Ok(report)
}
