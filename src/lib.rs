//! twinwatch — security monitoring for manufacturing digital-twin telemetry.
//!
//! A message walks through the rooms in this order (see the README's
//! architecture section):
//!
//! 1. [`source`] — capture file, simulator (and NATS): batches of [`source::Envelope`]s;
//! 2. [`decode`] — JSON payloads into Arrow tables (`readings`, `messages`, `flows`);
//! 3. [`window`] — per-machine event-time watermarks and tumbling windows;
//! 4. [`detect`] — per-(machine, metric) baselines: spike, shift, stuck, range, mode changes;
//! 5. [`score`] and [`alerts`] — tail probability → score → severity, dedup, deterministic ids;
//! 6. [`sink`] — NDJSON, console (and NATS).
//!
//! [`pipeline`] wires them; [`config`] holds every setting; [`sim`] is the
//! simulated factory; [`eval`] scores detection quality; [`bench`] measures
//! the pipeline on NATS against NATS's own delivery rate.

pub mod alerts;
pub mod bench;
pub mod cli;
pub mod config;
pub mod decode;
pub mod detect;
pub mod eval;
pub mod features;
pub mod helper;
pub mod http;
pub mod intern;
pub mod learn;
pub mod live;
pub mod memory;
pub mod nats;
pub mod ocsf;
pub mod pipeline;
pub mod registry;
pub mod score;
pub mod sim;
pub mod sink;
pub mod source;
pub mod state;
pub mod time;
pub mod window;
