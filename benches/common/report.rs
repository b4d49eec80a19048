//! Measurement helpers shared by `cargo bench` and `sotto-load`: repetitions, percentiles,
//! and one JSON object per figure on stdout.

use std::time::Duration;

use serde_json::{json, Value};

/// How big a run is: the real figures, or a quick pass that only proves the suite works.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scale {
    Full,
    Smoke,
}

impl Scale {
    /// `--smoke` anywhere in the arguments, or `SOTTO_BENCH_SMOKE=1`.
    pub fn from_args() -> Scale {
        let smoke = std::env::args().any(|a| a == "--smoke") || std::env::var("SOTTO_BENCH_SMOKE").is_ok_and(|v| v == "1");
        if smoke {
            Scale::Smoke
        } else {
            Scale::Full
        }
    }

    /// `full` for a real run, `smoke` for a smoke run.
    pub fn pick<T>(self, full: T, smoke: T) -> T {
        match self {
            Scale::Full => full,
            Scale::Smoke => smoke,
        }
    }
}

/// Figures named on the command line (any argument that is not an option), or all.
pub fn selected(name: &str) -> bool {
    let wanted: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with("--")).collect();
    wanted.is_empty() || wanted.iter().any(|w| name.contains(w.as_str()))
}

/// Sorted samples.
#[derive(Clone, Debug, Default)]
pub struct Samples(Vec<f64>);

impl Samples {
    pub fn new() -> Self {
        Self(Vec::new())
    }

    pub fn push(&mut self, v: f64) {
        self.0.push(v);
    }

    pub fn push_duration_us(&mut self, d: Duration) {
        self.0.push(d.as_secs_f64() * 1e6);
    }

    pub fn extend(&mut self, other: &Samples) {
        self.0.extend_from_slice(&other.0);
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// The `p`-th percentile (0–100), nearest rank.
    pub fn percentile(&self, p: f64) -> f64 {
        if self.0.is_empty() {
            return f64::NAN;
        }
        let mut v = self.0.clone();
        v.sort_by(f64::total_cmp);
        let rank = ((p / 100.0) * v.len() as f64).ceil() as usize;
        v[rank.clamp(1, v.len()) - 1]
    }

    pub fn median(&self) -> f64 {
        self.percentile(50.0)
    }

    pub fn min(&self) -> f64 {
        self.0.iter().copied().fold(f64::INFINITY, f64::min)
    }

    pub fn max(&self) -> f64 {
        self.0.iter().copied().fold(f64::NEG_INFINITY, f64::max)
    }
}

/// Which way is better, for the target check in the report.
#[derive(Clone, Copy, Debug)]
pub enum Better {
    Lower,
    Higher,
}

/// One line of the report.
pub struct Figure<'a> {
    pub name: &'a str,
    pub value: f64,
    pub unit: &'a str,
    /// The raw-stack figure from the same run, if the figure has one.
    pub baseline: Option<f64>,
    /// e.g. "<= 1.3": the ratio the table asks for.
    pub target: Option<&'a str>,
    pub better: Better,
    /// Spread of the per-repetition values (min, max), and anything else worth keeping.
    pub extra: Value,
}

fn round(v: f64) -> f64 {
    if !v.is_finite() {
        return v;
    }
    let digits = if v.abs() >= 100.0 { 1.0 } else { 1000.0 };
    (v * digits).round() / digits
}

impl Figure<'_> {
    pub fn emit(&self) -> Value {
        let ratio = self.baseline.map(|b| round(self.value / b));
        let met = match (ratio, self.target) {
            (Some(r), Some(t)) => target_met(r, t),
            _ => None,
        };
        let mut obj = json!({
            "name": self.name,
            "value": round(self.value),
            "unit": self.unit,
            "baseline": self.baseline.map(round),
            "ratio": ratio,
        });
        if let Some(t) = self.target {
            obj["target"] = json!(t);
            obj["target_met"] = json!(met);
        }
        obj["better"] = json!(match self.better {
            Better::Lower => "lower",
            Better::Higher => "higher",
        });
        if let Value::Object(extra) = &self.extra {
            for (k, v) in extra {
                obj[k] = v.clone();
            }
        }
        println!("{obj}");
        obj
    }
}

/// Checks "<= 1.3" or ">= 0.25" against a ratio.
fn target_met(ratio: f64, target: &str) -> Option<bool> {
    let (op, num) = target.split_once(' ')?;
    let num: f64 = num.parse().ok()?;
    match op {
        "<=" => Some(ratio <= num),
        ">=" => Some(ratio >= num),
        _ => None,
    }
}

/// Median, min and max of per-repetition values, as report fields.
pub fn spread(reps: &Samples) -> Value {
    json!({ "reps": reps.len(), "min": round(reps.min()), "max": round(reps.max()) })
}

/// Merges two JSON objects (the second wins).
pub fn merge(mut a: Value, b: Value) -> Value {
    if let (Value::Object(a), Value::Object(b)) = (&mut a, b) {
        a.extend(b);
    }
    a
}

/// CPU time this process has used so far, user and system, on every thread. Beside a
/// throughput it tells what each operation costs even when other work shares the cores.
pub fn cpu_time() -> std::time::Duration {
    // SAFETY: getrusage only writes into the struct it is given.
    let usage = unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut usage);
        usage
    };
    let micros = |t: libc::timeval| t.tv_sec as u64 * 1_000_000 + t.tv_usec as u64;
    std::time::Duration::from_micros(micros(usage.ru_utime) + micros(usage.ru_stime))
}
