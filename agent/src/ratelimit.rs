//! One log line per interval for things that can happen in floods (rejected
//! adapter messages, refused HTTP connections, accept errors), saying how
//! many were held back since, so that a misbehaving client cannot flood the
//! log.

use std::time::{Duration, Instant};

pub struct RateLimitedLog {
    interval: Duration,
    last: Option<Instant>,
    suppressed: u64,
}

impl RateLimitedLog {
    pub fn new(interval: Duration) -> RateLimitedLog {
        RateLimitedLog {
            interval,
            last: None,
            suppressed: 0,
        }
    }

    /// Whether to log this occurrence: `Some` with how many were held back
    /// since the last line, or `None` (counted) within the interval.
    pub fn allow(&mut self, now: Instant) -> Option<u64> {
        match self.last {
            Some(last) if now.duration_since(last) < self.interval => {
                self.suppressed += 1;
                None
            }
            _ => {
                self.last = Some(now);
                Some(std::mem::take(&mut self.suppressed))
            }
        }
    }

    /// Returns the line to log now, if any.
    pub fn line(&mut self, now: Instant, text: &str) -> Option<String> {
        self.allow(now).map(|suppressed| {
            if suppressed > 0 {
                format!("{text} ({suppressed} more rejected since the last report)")
            } else {
                text.to_string()
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_limited_log_counts_what_it_suppresses() {
        let mut log = RateLimitedLog::new(Duration::from_secs(1));
        let t0 = Instant::now();
        assert_eq!(log.line(t0, "bad").as_deref(), Some("bad"));
        assert_eq!(log.line(t0, "bad"), None);
        assert_eq!(log.line(t0, "bad"), None);
        let later = t0 + Duration::from_secs(2);
        assert_eq!(
            log.line(later, "bad").as_deref(),
            Some("bad (2 more rejected since the last report)")
        );
    }

    #[test]
    fn allow_says_how_many_were_held_back() {
        let mut log = RateLimitedLog::new(Duration::from_secs(10));
        let t0 = Instant::now();
        assert_eq!(log.allow(t0), Some(0));
        assert_eq!(log.allow(t0 + Duration::from_secs(1)), None);
        assert_eq!(log.allow(t0 + Duration::from_secs(9)), None);
        assert_eq!(log.allow(t0 + Duration::from_secs(10)), Some(2));
        assert_eq!(log.allow(t0 + Duration::from_secs(11)), None);
    }
}
