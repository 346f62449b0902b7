//! Target groups: which target of a service gets the next request. Round robin or fewest
//! requests in flight, a sticky cookie, slow start for new targets, and passive outlier
//! detection. A group's state (its round-robin position, each target's requests in flight,
//! failures and ejection) lives as long as the group and its targets do, across table
//! rebuilds: every status write rebuilds the table.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use dozen_model::Target;
use dozen_spec::{Algorithm, Balance};

/// Milliseconds on the proxy's own clock (monotonic, from the first use).
pub fn now_ms() -> u64 {
    static EPOCH: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    EPOCH.get_or_init(Instant::now).elapsed().as_millis() as u64
}

/// A cheap, good-enough random number (splitmix64 over a shared counter): for slow start's
/// coin flips, where nothing depends on it being unpredictable.
fn random() -> u64 {
    static STATE: AtomicU64 = AtomicU64::new(0x9e37_79b9_7f4a_7c15);
    let mut z = STATE.fetch_add(0x9e37_79b9_7f4a_7c15, Ordering::Relaxed);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Requests by status class (1xx to 5xx) and latency buckets, for the metrics to read.
#[derive(Default)]
pub struct Counters {
    pub by_class: [AtomicU64; 5],
    /// Answers that never came (no connection, lost connection, timeout).
    pub failed: AtomicU64,
    pub response_bytes: AtomicU64,
    /// Upper bounds of [`LATENCY_BUCKETS_MS`], then one for anything slower.
    pub latency: [AtomicU64; LATENCY_BUCKETS_MS.len() + 1],
}

pub const LATENCY_BUCKETS_MS: [u64; 12] = [1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 10000];

impl Counters {
    pub fn record(&self, status: Option<u16>, elapsed_ms: u64) {
        match status {
            Some(s @ 100..=599) => {
                self.by_class[usize::from(s / 100 - 1)].fetch_add(1, Ordering::Relaxed);
            }
            _ => {
                self.failed.fetch_add(1, Ordering::Relaxed);
            }
        }
        let bucket = LATENCY_BUCKETS_MS
            .iter()
            .position(|b| elapsed_ms <= *b)
            .unwrap_or(LATENCY_BUCKETS_MS.len());
        self.latency[bucket].fetch_add(1, Ordering::Relaxed);
    }
}

/// One target and what this proxy knows of it.
pub struct TargetState {
    pub task: String,
    pub addr: String,
    /// When it joined its group (proxy clock): its slow start counts from here. None: it was
    /// there when the proxy started.
    joined_ms: Option<u64>,
    in_flight: AtomicUsize,
    consecutive_errors: AtomicU32,
    /// Until when (proxy clock) it gets no requests; 0: not ejected.
    ejected_until_ms: AtomicU64,
    pub counters: Counters,
}

impl TargetState {
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    pub fn ejected(&self, now: u64) -> bool {
        self.ejected_until_ms.load(Ordering::Relaxed) > now
    }
}

/// Counts a request in flight on a target until dropped (with the response body, so
/// "outstanding" lasts until the answer is fully sent).
pub struct InFlight(Arc<TargetState>);

impl InFlight {
    pub fn new(target: Arc<TargetState>) -> InFlight {
        target.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(target)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A service's targets and how they share its requests.
pub struct Group {
    pub name: String,
    pub balance: Balance,
    pub targets: Vec<Arc<TargetState>>,
    next: Arc<AtomicUsize>,
    pub counters: Arc<Counters>,
}

/// What a pick gives: the target, another one to retry on, and whether the client should be
/// given the sticky cookie.
pub struct Pick {
    pub target: Arc<TargetState>,
    pub retry: Option<Arc<TargetState>>,
    pub set_cookie: Option<String>,
}

impl Group {
    /// The group for `targets`, keeping the state of targets and of the group that
    /// `previous` (the same group in the table being replaced) knew. Targets of a group new
    /// to this proxy (the proxy just started) or that had none (the service's first) are
    /// warm: slow start is for targets joining a service that already serves.
    pub fn new(
        name: String,
        balance: Balance,
        targets: Vec<Target>,
        previous: Option<&Group>,
    ) -> Group {
        let first_table = previous.is_none_or(|g| g.targets.is_empty());
        let now = now_ms();
        let known: HashMap<(&str, &str), &Arc<TargetState>> = previous
            .map(|g| {
                g.targets
                    .iter()
                    .map(|t| ((t.task.as_str(), t.addr.as_str()), t))
                    .collect()
            })
            .unwrap_or_default();
        let targets = targets
            .into_iter()
            .map(|t| match known.get(&(t.task.as_str(), t.addr.as_str())) {
                Some(state) => Arc::clone(state),
                None => Arc::new(TargetState {
                    task: t.task,
                    addr: t.addr,
                    joined_ms: (!first_table).then_some(now),
                    in_flight: AtomicUsize::new(0),
                    consecutive_errors: AtomicU32::new(0),
                    ejected_until_ms: AtomicU64::new(0),
                    counters: Counters::default(),
                }),
            })
            .collect();
        Group {
            name,
            balance,
            targets,
            next: previous.map_or_else(|| Arc::new(AtomicUsize::new(0)), |g| g.next.clone()),
            counters: previous.map_or_else(Default::default, |g| g.counters.clone()),
        }
    }

    /// Targets that may get requests now: not ejected, unless every one is (then all: an
    /// ejection must never leave a service with nothing).
    fn eligible(&self, now: u64) -> impl Iterator<Item = (usize, &Arc<TargetState>)> {
        let any_in = self.targets.iter().any(|t| !t.ejected(now));
        self.targets
            .iter()
            .enumerate()
            .filter(move |(_, t)| !any_in || !t.ejected(now))
    }

    /// A target's share, from 1/1000 when it joins to 1 at the end of its slow start.
    fn share(&self, t: &TargetState, now: u64) -> u64 {
        let ramp = self.balance.slow_start_ms;
        match t.joined_ms {
            Some(joined) if ramp > 0 => (now.saturating_sub(joined) * 1000 / ramp).clamp(1, 1000),
            _ => 1000,
        }
    }

    /// Whether a target still ramping up passes on this request: it takes requests in
    /// proportion to its share against the largest share in the group.
    fn ramping_declines(&self, t: &TargetState, now: u64, top: u64) -> bool {
        let share = self.share(t, now);
        share < top && random() % top >= share
    }

    /// The target for the next request; `cookie`: the sticky cookie's value, if the client
    /// sent one.
    pub fn pick(&self, cookie: Option<&str>) -> Option<Pick> {
        let now = now_ms();
        if let (Some(_), Some(task)) = (&self.balance.sticky, cookie) {
            let held = self.eligible(now).find(|(_, t)| t.task == task);
            if let Some((i, t)) = held {
                return Some(Pick {
                    target: t.clone(),
                    retry: self.other_than(i, now),
                    set_cookie: None,
                });
            }
        }
        let eligible: Vec<(usize, &Arc<TargetState>)> = self.eligible(now).collect();
        if eligible.is_empty() {
            return None;
        }
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let n = eligible.len();
        let top = if self.balance.slow_start_ms == 0 {
            1000
        } else {
            eligible
                .iter()
                .map(|(_, t)| self.share(t, now))
                .max()
                .unwrap_or(1000)
        };
        let order = (0..n).map(|k| eligible[(start + k) % n]);
        let chosen = match self.balance.algorithm {
            Algorithm::RoundRobin => order
                .clone()
                .find(|(_, t)| !self.ramping_declines(t, now, top))
                .unwrap_or(eligible[start % n]),
            Algorithm::LeastOutstanding => order
                .clone()
                .filter(|(_, t)| !self.ramping_declines(t, now, top))
                .min_by_key(|(_, t)| t.in_flight())
                .unwrap_or(eligible[start % n]),
        };
        let (i, target) = chosen;
        Some(Pick {
            target: target.clone(),
            retry: self.other_than(i, now),
            set_cookie: self
                .balance
                .sticky
                .as_ref()
                .map(|s| sticky_cookie(&s.cookie, &target.task, s.duration_ms)),
        })
    }

    fn other_than(&self, i: usize, now: u64) -> Option<Arc<TargetState>> {
        let n = self.targets.len();
        (1..n)
            .map(|k| &self.targets[(i + k) % n])
            .find(|t| !t.ejected(now))
            .cloned()
    }

    /// What became of a request sent to `target`: an answer below 500 clears its failures;
    /// a 5xx or no answer counts one, and enough in a row eject it (while no more than half
    /// the group is out).
    pub fn outcome(&self, target: &TargetState, ok: bool) {
        let limit = self.balance.outlier.consecutive_errors;
        if ok {
            if target.consecutive_errors.load(Ordering::Relaxed) != 0 {
                target.consecutive_errors.store(0, Ordering::Relaxed);
            }
            return;
        }
        if limit == 0 {
            return;
        }
        let failures = target.consecutive_errors.fetch_add(1, Ordering::Relaxed) + 1;
        let now = now_ms();
        if failures >= limit && !target.ejected(now) {
            let out = self.targets.iter().filter(|t| t.ejected(now)).count();
            if (out + 1) * 2 <= self.targets.len() {
                target.ejected_until_ms.store(
                    now.saturating_add(self.balance.outlier.ejection_ms),
                    Ordering::Relaxed,
                );
                // Back after the ejection with one failure to spare: its first request
                // proves it, or puts it out again.
                target
                    .consecutive_errors
                    .store(limit.saturating_sub(1), Ordering::Relaxed);
                tracing::warn!(group = %self.name, target = %target.addr, task = %target.task, failures, ejection_ms = self.balance.outlier.ejection_ms, "target ejected after failures in a row");
            }
        }
    }
}

fn sticky_cookie(name: &str, task: &str, duration_ms: u64) -> String {
    format!(
        "{name}={task}; Path=/; Max-Age={}; HttpOnly; SameSite=Lax",
        duration_ms / 1000
    )
}

/// The value of cookie `name` in a request's `Cookie` headers.
pub fn cookie<'a>(headers: &'a hyper::HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(hyper::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.trim_matches('"'))
}

#[cfg(test)]
mod tests {
    use super::*;
    use dozen_spec::{Outlier, Sticky};

    fn targets(n: usize) -> Vec<Target> {
        (0..n)
            .map(|i| Target {
                task: format!("t{i}"),
                addr: format!("a:{i}"),
            })
            .collect()
    }

    fn share(g: &Group, picks: usize) -> HashMap<String, usize> {
        let mut seen = HashMap::new();
        for _ in 0..picks {
            *seen
                .entry(g.pick(None).unwrap().target.task.clone())
                .or_default() += 1;
        }
        seen
    }

    #[test]
    fn least_outstanding_avoids_the_busy_target() {
        let balance = Balance {
            algorithm: Algorithm::LeastOutstanding,
            ..Balance::default()
        };
        let g = Group::new("web".into(), balance, targets(3), None);
        let busy: Vec<InFlight> = (0..5)
            .map(|_| InFlight::new(g.targets[0].clone()))
            .collect();
        let seen = share(&g, 30);
        assert_eq!(seen.get("t0"), None, "{seen:?}");
        drop(busy);
        assert_eq!(g.targets[0].in_flight(), 0);
    }

    #[test]
    fn a_failing_target_is_ejected_then_proves_itself_and_half_stay_in() {
        let balance = Balance {
            outlier: Outlier {
                consecutive_errors: 3,
                ejection_ms: 60_000,
            },
            ..Balance::default()
        };
        let g = Group::new("web".into(), balance, targets(2), None);
        let (a, b) = (g.targets[0].clone(), g.targets[1].clone());
        g.outcome(&a, false);
        g.outcome(&a, false);
        g.outcome(&a, true);
        g.outcome(&a, false);
        g.outcome(&a, false);
        assert!(
            !a.ejected(now_ms()),
            "a success in between clears the count"
        );
        g.outcome(&a, false);
        assert!(a.ejected(now_ms()));
        assert_eq!(share(&g, 10).get("t1"), Some(&10));
        for _ in 0..5 {
            g.outcome(&b, false);
        }
        assert!(!b.ejected(now_ms()), "never more than half the group out");
        // After its ejection one failure puts it out again.
        a.ejected_until_ms.store(0, Ordering::Relaxed);
        g.outcome(&a, false);
        assert!(a.ejected(now_ms()));
    }

    #[test]
    fn a_sticky_client_stays_and_others_get_a_cookie() {
        let balance = Balance {
            sticky: Some(Sticky {
                cookie: "s".into(),
                duration_ms: 3_600_000,
            }),
            ..Balance::default()
        };
        let g = Group::new("web".into(), balance, targets(3), None);
        for _ in 0..5 {
            let p = g.pick(Some("t2")).unwrap();
            assert_eq!(p.target.task, "t2");
            assert!(p.set_cookie.is_none());
        }
        let p = g.pick(Some("gone")).unwrap();
        let set = p.set_cookie.unwrap();
        assert!(
            set.starts_with(&format!("s={}; Path=/; Max-Age=3600", p.target.task)),
            "{set}"
        );
    }

    #[test]
    fn state_survives_a_rebuild_and_new_targets_start_slowly() {
        let balance = Balance {
            slow_start_ms: 60_000,
            ..Balance::default()
        };
        // A service's first targets (its group had none) start warm.
        let g0 = Group::new("web".into(), balance.clone(), targets(0), None);
        let g1 = Group::new("web".into(), balance.clone(), targets(2), Some(&g0));
        let held = InFlight::new(g1.targets[1].clone());
        let g2 = Group::new("web".into(), balance, targets(3), Some(&g1));
        assert_eq!(g2.targets[1].in_flight(), 1, "the same target's count");
        drop(held);
        assert_eq!(g2.targets[1].in_flight(), 0);
        // t2 just joined: almost no share at the start of a minute's ramp.
        let seen = share(&g2, 3000);
        assert!(seen.get("t2").copied().unwrap_or(0) < 30, "{seen:?}");
    }
}
