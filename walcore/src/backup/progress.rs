//! A progress line for a terminal: bytes done, of how many when known, and the rate. Off a
//! terminal it draws nothing (the operations log one line per phase instead).

use std::io::Write;
use std::time::{Duration, Instant};

/// How often the line is redrawn.
const REDRAW: Duration = Duration::from_millis(250);

#[derive(Debug)]
pub struct Meter {
    enabled: bool,
    started: Instant,
    last_draw: Instant,
    done: u64,
    total: Option<u64>,
    drawn: bool,
}

impl Meter {
    pub fn new(enabled: bool) -> Meter {
        let now = Instant::now();
        Meter {
            enabled,
            started: now,
            last_draw: now,
            done: 0,
            total: None,
            drawn: false,
        }
    }

    pub fn set_total(&mut self, total: Option<u64>) {
        self.total = total.filter(|t| *t > 0);
    }

    pub fn add(&mut self, n: u64) {
        self.done += n;
        if self.enabled && self.last_draw.elapsed() >= REDRAW {
            self.draw();
        }
    }

    /// Bytes counted so far.
    pub fn done(&self) -> u64 {
        self.done
    }

    fn draw(&mut self) {
        self.last_draw = Instant::now();
        let secs = self.started.elapsed().as_secs_f64().max(0.001);
        let rate = self.done as f64 / secs;
        let line = match self.total {
            // The server's estimate is from before the copy: never show more than 100 %.
            Some(t) => format!(
                "{} of ~{} ({:.0}%), {}/s",
                human(self.done),
                human(t),
                (self.done as f64 / t as f64 * 100.0).min(100.0),
                human(rate as u64)
            ),
            None => format!("{}, {}/s", human(self.done), human(rate as u64)),
        };
        let mut err = std::io::stderr().lock();
        let _ = write!(err, "\r\x1b[2K{line}");
        let _ = err.flush();
        self.drawn = true;
    }

    /// Draws the final state and ends the line.
    pub fn finish(&mut self) {
        if self.enabled {
            self.draw();
            let _ = writeln!(std::io::stderr());
        }
    }
}

/// `1.5 GiB`, `12.0 MiB`, `512 B`.
pub fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::human;

    #[test]
    fn human_sizes() {
        assert_eq!(human(512), "512 B");
        assert_eq!(human(1536), "1.5 KiB");
        assert_eq!(human(3 << 30), "3.0 GiB");
    }
}
