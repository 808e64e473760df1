//! Broker settings the integration tests share.

use framecast_shared::config::BrokerConfig;

/// A planner that plans at once: rounds every 200 ms, no hysteresis, at least one warm
/// instance for anything asked for, and heartbeats that report back quickly.
pub(crate) fn fast_planner(c: &mut BrokerConfig) {
    c.control.heartbeat_interval_ms = 100;
    c.planner.round_every_s = 0.2;
    c.planner.short_window_s = 5.0;
    c.planner.long_window_s = 10.0;
    c.planner.launch_time_s = 2.0;
    c.planner.hysteresis_rounds = 0;
    c.planner.min_warm = 1;
    c.planner.daily_profile = false;
}
