//! The results of a run: a sample's statistics, the table of rows it prints (median [min–max],
//! the ratio to the reference, bicsi's peak RSS) and the correctness checks whose failure fails
//! the run. It must not time or run anything.

use super::*;

/// Durations of the runs of one side, in seconds.
#[derive(Clone, Debug, Default)]
pub(crate) struct Stats(pub(crate) Vec<f64>);

impl Stats {
    pub(crate) fn push(&mut self, d: Duration) {
        self.0.push(d.as_secs_f64());
    }

    pub(crate) fn sorted(&self) -> Vec<f64> {
        let mut v = self.0.clone();
        v.sort_by(f64::total_cmp);
        v
    }

    pub(crate) fn median(&self) -> f64 {
        let v = self.sorted();
        match v.len() {
            0 => f64::NAN,
            n if n % 2 == 1 => v[n / 2],
            n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
        }
    }

    pub(crate) fn min(&self) -> f64 {
        self.sorted().first().copied().unwrap_or(f64::NAN)
    }

    pub(crate) fn max(&self) -> f64 {
        self.sorted().last().copied().unwrap_or(f64::NAN)
    }

    /// `6.62 s [6.40–7.01]`; three decimals when every run took under a second.
    pub(crate) fn show(&self) -> String {
        let p = if self.max() < 1.0 { 3 } else { 2 };
        if self.0.len() == 1 {
            format!("{:.p$} s", self.median())
        } else {
            format!(
                "{:.p$} s [{:.p$}–{:.p$}]",
                self.median(),
                self.min(),
                self.max()
            )
        }
    }
}

/// One line of the result table: bicsi and its reference on one path, from the same runs.
pub(crate) struct Row {
    pub(crate) path: String,
    pub(crate) bicsi: Stats,
    pub(crate) reference: Stats,
    pub(crate) ref_name: String,
    /// Largest VmHWM of the bicsi process over the runs.
    pub(crate) peak_rss: Option<u64>,
    /// Printed under the table: what the figures include, the bound.
    pub(crate) note: Option<String>,
}

pub(crate) fn print_table(rows: &[Row]) {
    let header = [
        "path",
        "bicsi median [min–max]",
        "reference",
        "reference median [min–max]",
        "bicsi / ref",
        "bicsi peak RSS",
    ];
    let cells: Vec<[String; 6]> = rows
        .iter()
        .map(|r| {
            [
                r.path.clone(),
                r.bicsi.show(),
                format!("`{}`", r.ref_name.replace('|', "\\|")),
                r.reference.show(),
                format!("{:.2}", r.bicsi.median() / r.reference.median()),
                r.peak_rss.map_or("n/a".into(), fmt_bytes),
            ]
        })
        .collect();
    let mut width = header.map(|h| h.chars().count());
    for row in &cells {
        for (w, c) in width.iter_mut().zip(row) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |cols: &[String]| {
        let mut s = String::from("|");
        for (c, w) in cols.iter().zip(width) {
            let pad = w - c.chars().count();
            let _ = write!(s, " {c}{} |", " ".repeat(pad));
        }
        println!("{s}");
    };
    line(&header.map(String::from));
    line(&width.map(|w| "-".repeat(w)));
    for row in &cells {
        line(row);
    }
}

/// Correctness checks: printed as they happen; any failure makes the run exit 1.
#[derive(Default)]
pub(crate) struct Checks {
    pub(crate) failed: Vec<String>,
}

impl Checks {
    pub(crate) fn check(&mut self, ok: bool, what: impl Into<String>) -> bool {
        let what = what.into();
        if !ok {
            println!("  CHECK FAILED: {what}");
            self.failed.push(what);
        }
        ok
    }
}
