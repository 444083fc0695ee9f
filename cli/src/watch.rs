//! Operator events from successive views of a running system: a log line (through
//! `tracing`) when a pair changes state at either end and when a pair's or the group's
//! commit lag crosses `rpo_target_ms` (once when it crosses, once when it recovers).
//! Peers going up and down are logged by the link itself (`peer connected`,
//! `peer disconnected`).

use crate::view::SystemView;
use std::collections::BTreeMap;

/// Something an operator should hear about.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// A pair's state at one end (`end`: `primary` or `secondary`); `from` is `None` the
    /// first time the pair is seen.
    State {
        system: String,
        pair: String,
        end: String,
        from: Option<String>,
        to: String,
    },
    /// A pair's commit lag went above the RPO target (`exceeded`) or back to it.
    Rpo {
        system: String,
        pair: String,
        exceeded: bool,
        lag_ms: u64,
        target_ms: u64,
    },
    /// The group's commit lag (at the orderer's system) did the same.
    GroupRpo {
        system: String,
        exceeded: bool,
        lag_ms: u64,
        target_ms: u64,
    },
}

/// What was seen last, per (system, pair, end).
#[derive(Default)]
pub struct Events {
    states: BTreeMap<(String, String, String), String>,
    rpo: BTreeMap<(String, String), bool>,
    group_rpo: BTreeMap<String, bool>,
}

impl Events {
    /// The events between the last view of `v.system` and `v`, logged.
    pub fn observe(&mut self, v: &SystemView) -> Vec<Event> {
        let mut out = Vec::new();
        for p in &v.pairs {
            let key = (v.system.clone(), p.name.clone(), p.end.clone());
            let from = self.states.insert(key, p.state.clone());
            if from.as_deref() != Some(p.state.as_str()) {
                out.push(Event::State {
                    system: v.system.clone(),
                    pair: p.name.clone(),
                    end: p.end.clone(),
                    from,
                    to: p.state.clone(),
                });
            }
            if let (Some(exceeded), Some(lag_ms), Some(target_ms)) =
                (p.rpo_exceeded, p.lag_ms, v.rpo_target_ms)
            {
                let was = self
                    .rpo
                    .insert((v.system.clone(), p.name.clone()), exceeded)
                    .unwrap_or(false);
                if was != exceeded {
                    out.push(Event::Rpo {
                        system: v.system.clone(),
                        pair: p.name.clone(),
                        exceeded,
                        lag_ms,
                        target_ms,
                    });
                }
            }
        }
        if let (Some(o), Some(target_ms)) = (&v.orderer, v.rpo_target_ms) {
            if let (Some(exceeded), Some(lag_ms)) = (o.rpo_exceeded, o.lag_ms) {
                let was = self
                    .group_rpo
                    .insert(v.system.clone(), exceeded)
                    .unwrap_or(false);
                if was != exceeded {
                    out.push(Event::GroupRpo {
                        system: v.system.clone(),
                        exceeded,
                        lag_ms,
                        target_ms,
                    });
                }
            }
        }
        for e in &out {
            log(e);
        }
        out
    }
}

fn log(e: &Event) {
    match e {
        Event::State {
            system,
            pair,
            end,
            from,
            to,
        } => {
            let from = from.as_deref().unwrap_or("start");
            if to == "tracking" || to == "inconsistent" {
                tracing::warn!(system, pair, end, from, to, "pair state changed");
            } else {
                tracing::info!(system, pair, end, from, to, "pair state changed");
            }
        }
        Event::Rpo {
            system,
            pair,
            exceeded: true,
            lag_ms,
            target_ms,
        } => tracing::warn!(system, pair, lag_ms, target_ms, "RPO target exceeded"),
        Event::Rpo {
            system,
            pair,
            exceeded: false,
            lag_ms,
            target_ms,
        } => tracing::info!(system, pair, lag_ms, target_ms, "RPO target met again"),
        Event::GroupRpo {
            system,
            exceeded: true,
            lag_ms,
            target_ms,
        } => tracing::warn!(system, lag_ms, target_ms, "group RPO target exceeded"),
        Event::GroupRpo {
            system,
            exceeded: false,
            lag_ms,
            target_ms,
        } => tracing::info!(system, lag_ms, target_ms, "group RPO target met again"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::view::PairView;

    fn view(state: &str, lag_ms: u64) -> SystemView {
        SystemView {
            system: "site-b".into(),
            rpo_target_ms: Some(100),
            pairs: vec![PairView {
                name: "log".into(),
                end: "secondary".into(),
                state: state.into(),
                lag_ms: Some(lag_ms),
                rpo_exceeded: Some(lag_ms > 100),
                ..PairView::default()
            }],
            ..SystemView::default()
        }
    }

    #[test]
    fn each_crossing_and_state_change_is_one_event() {
        let mut e = Events::default();
        let first = e.observe(&view("consistent", 10));
        assert!(
            matches!(&first[..], [Event::State { from: None, .. }]),
            "{first:?}"
        );
        assert_eq!(e.observe(&view("consistent", 20)), vec![]);
        let up = e.observe(&view("consistent", 150));
        assert!(
            matches!(
                &up[..],
                [Event::Rpo {
                    exceeded: true,
                    lag_ms: 150,
                    ..
                }]
            ),
            "{up:?}"
        );
        assert_eq!(
            e.observe(&view("consistent", 300)),
            vec![],
            "once per crossing"
        );
        let down = e.observe(&view("inconsistent", 50));
        assert_eq!(down.len(), 2, "{down:?}");
        assert!(down.contains(&Event::Rpo {
            system: "site-b".into(),
            pair: "log".into(),
            exceeded: false,
            lag_ms: 50,
            target_ms: 100
        }));
        assert_eq!(e.observe(&view("inconsistent", 50)), vec![]);
    }
}
