//! Window: event-time bookkeeping per machine.
//!
//! Each machine has its own watermark, `newest event time seen − allowed
//! lateness`, because machines' clocks and links differ and one slow machine
//! must not hold back the others. Telemetry and flow records keep separate
//! watermarks: they come from different collectors over different paths (and
//! different subscriptions), so flow records running ahead must not make a
//! machine's telemetry late. Tumbling windows of `window.size`, aligned
//! to the epoch, close for a machine once its watermark passes their end.
//! A message whose window has already closed is *late*: it is counted and kept
//! out of the window tables, but the fast path still scores it. A message
//! dated more than `window.max_future` ahead of its arrival is *future*: it
//! never moves the watermark (one forged timestamp would otherwise close every
//! window of the machine and make all its honest data late).
//!
//! Rows wait here in the batches they arrived in; each call to
//! [`Windows::close`] hands over, as one set of tables, every machine-window
//! that closed since the last call, with `window_start` and `window_end`
//! columns added, so the feature queries run once per batch over all machines
//! rather than once per machine. A table is handed over as the parts it
//! waited in ([`Table`]), never concatenated here: a batch whose rows all
//! closed goes as it is, so closing the windows of thousands of machines at
//! once copies nothing on the ingest loop; a batch that closes in parts hands
//! over its closed rows and keeps only its open ones. Only the columns the
//! query files read are kept ([`Windows::read_only`]); the others are zeros
//! sliced from one shared buffer, so a waiting row costs what the queries use.
//! When the files read `readings` only through plain group-bys by machine and
//! window, its rows are not kept at all: [`groups`] sums them up as they arrive.

mod groups;

use std::sync::Arc;

use arrow::array::{Array, ArrayRef, BooleanArray, TimestampMillisecondArray, UInt32Array};
use arrow::compute::{concat_batches, filter_record_batch};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use arrow::record_batch::RecordBatch;

use crate::config::WindowConfig;
use crate::decode::DecodedBatch;
use crate::time::{Millis, window_start};

pub use groups::{Acc, ClosedGroup, ClosedGroups, GroupSpec, MAX_NAMES};

/// How an event stands against its machine's watermark.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Its window is still open.
    OnTime,
    /// Its window has closed already.
    Late,
    /// Dated too far ahead of its arrival; ignored by the watermark.
    Future,
    /// From a sender that may not teach baselines (see [`crate::detect::identity`]):
    /// ignored by the watermark and kept out of the windows.
    Untrusted,
}

#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Clock {
    newest: Millis,
    /// Windows ending at or before this instant are closed.
    closed_upto: Millis,
}

const NO_CLOCK: Clock = Clock {
    newest: Millis::MIN,
    closed_upto: Millis::MIN,
};

/// One window table: batches of one schema, in arrival order.
#[derive(Debug, Clone)]
pub struct Table {
    pub schema: SchemaRef,
    pub parts: Vec<RecordBatch>,
}

impl Table {
    fn new(schema: SchemaRef) -> Self {
        Table {
            schema,
            parts: Vec::new(),
        }
    }

    pub fn num_rows(&self) -> usize {
        self.parts.iter().map(RecordBatch::num_rows).sum()
    }

    /// The whole table as one batch (a copy; for tests and tools).
    pub fn concat(&self) -> RecordBatch {
        concat_batches(&self.schema, &self.parts).expect("parts share the schema")
    }

    /// Adds another table's parts after these.
    pub fn extend(&mut self, other: Table) {
        self.parts.extend(other.parts);
    }
}

/// The machine-windows that closed, as tables.
#[derive(Debug, Clone)]
pub struct ClosedWindows {
    /// `readings` rows (see [`crate::decode`]) plus `window_start`, `window_end`.
    pub readings: Table,
    /// `messages` rows plus `window_start`, `window_end`.
    pub messages: Table,
    /// `flows` rows plus `window_start`, `window_end`.
    pub flows: Table,
    /// Group-bys of `readings` summed up as the rows arrived (see [`groups`]),
    /// for windows whose rows were not kept.
    pub groups: Vec<ClosedGroups>,
    /// How many distinct (machine, window) pairs closed.
    pub machine_windows: usize,
    /// The oldest window start and the newest window end among them (the
    /// query stage times its runs by these, whatever columns the rows keep).
    pub span: (Millis, Millis),
}

impl ClosedWindows {
    /// Adds another set's tables and groups after these (their parts, not
    /// copied), as one run takes windows that closed apart.
    pub fn extend(&mut self, other: ClosedWindows) {
        self.readings.extend(other.readings);
        self.messages.extend(other.messages);
        self.flows.extend(other.flows);
        self.groups.extend(other.groups);
        self.machine_windows += other.machine_windows;
        self.span = span_union(self.span, other.span);
    }
}

/// The span covering two spans (oldest start, newest end).
pub fn span_union(a: (Millis, Millis), b: (Millis, Millis)) -> (Millis, Millis) {
    (a.0.min(b.0), a.1.max(b.1))
}

/// Rows of one table waiting for their windows to close.
struct TableBuffer {
    schema: SchemaRef,
    /// Columns of the decoded table kept in window tables (batch-local row links are dropped).
    keep: Vec<usize>,
    kept: Kept,
    pending: Vec<Pending>,
}

/// Which window-table columns some query file reads (`read`, `None`: all).
/// The others are kept as zeros sliced from one shared buffer, so a row costs
/// only what the queries look at.
#[derive(Default)]
struct Kept {
    read: Option<Vec<bool>>,
    zeros: Zeros,
}

impl Kept {
    /// Whether no file reads column `i`.
    fn unread(&self, i: usize) -> bool {
        self.read.as_ref().is_some_and(|r| !r[i])
    }

    /// The columns of `n` rows: `cut(column)` where it is read, zeros elsewhere
    /// (never cut: filtering zeros would allocate real ones).
    fn columns(
        &mut self,
        cols: &[ArrayRef],
        n: usize,
        cut: impl Fn(&ArrayRef) -> ArrayRef,
    ) -> Vec<ArrayRef> {
        cols.iter()
            .enumerate()
            .map(|(i, c)| {
                self.unread(i)
                    .then(|| self.zeros.column(c.data_type(), n))
                    .flatten()
                    .unwrap_or_else(|| cut(c))
            })
            .collect()
    }
}

/// Placeholder columns: zero values (no nulls, so non-nullable fields stay
/// valid) sliced from one buffer shared by every batch.
#[derive(Default)]
struct Zeros(Option<arrow::buffer::Buffer>);

impl Zeros {
    /// `n` zeros of type `dt` (empty strings for text); `None` for a type
    /// without a zero form here.
    fn column(&mut self, dt: &DataType, n: usize) -> Option<ArrayRef> {
        use arrow::array::{ArrayData, StringArray, make_array};
        let need = (n + 1) * 16;
        if self.0.as_ref().is_none_or(|b| b.len() < need) {
            let len = need.next_power_of_two();
            self.0 = Some(arrow::buffer::MutableBuffer::from_len_zeroed(len).into());
        }
        let zeros = self.0.as_ref()?;
        let data = match dt {
            DataType::Utf8 => ArrayData::builder(dt.clone())
                .len(n)
                .add_buffer(zeros.slice_with_length(0, (n + 1) * 4))
                .add_buffer(arrow::buffer::Buffer::from_vec(Vec::<u8>::new())),
            DataType::Dictionary(key, value)
                if **key == DataType::UInt32 && **value == DataType::Utf8 =>
            {
                ArrayData::builder(dt.clone())
                    .len(n)
                    .add_buffer(zeros.slice_with_length(0, n * 4))
                    .add_child_data(StringArray::from(vec![""]).into_data())
            }
            _ => {
                let width = dt.primitive_width()?;
                ArrayData::builder(dt.clone())
                    .len(n)
                    .add_buffer(zeros.slice_with_length(0, n * width))
            }
        };
        data.build().ok().map(make_array)
    }
}

struct Pending {
    batch: RecordBatch,
    /// The batch's rows as runs of one (machine, window), in row order:
    /// kept apart because the batch's own columns may be placeholders, and
    /// as runs because rows of a message (and of a machine's array payload)
    /// come together, so a close looks at a run, not at each of its rows.
    runs: Vec<Run>,
    n_open: usize,
    /// The earliest window start among the open rows: no row can close
    /// before some machine's clock passes its end, so most batches are
    /// skipped without looking at their runs.
    min_start: Millis,
}

/// Consecutive rows of one machine-window.
#[derive(Debug, Clone, Copy)]
struct Run {
    machine: u32,
    start: Millis,
    rows: usize,
    open: bool,
}

/// The runs of equal (machine, window start) in two parallel columns.
fn runs(machine: &[u32], start: &[Millis]) -> Vec<Run> {
    let mut out: Vec<Run> = Vec::new();
    for (&m, &s) in machine.iter().zip(start) {
        match out.last_mut() {
            Some(r) if r.machine == m && r.start == s => r.rows += 1,
            _ => out.push(Run {
                machine: m,
                start: s,
                rows: 1,
                open: true,
            }),
        }
    }
    out
}

/// A row mask from runs: `pick(run)` for each of its rows.
fn mask_of(runs: &[Run], pick: impl Fn(&Run) -> bool) -> BooleanArray {
    let mut b = arrow::array::BooleanBufferBuilder::new(runs.iter().map(|r| r.rows).sum());
    for r in runs {
        b.append_n(r.rows, pick(r));
    }
    BooleanArray::new(b.finish(), None)
}

impl Pending {
    /// Keeps only the open rows; `batch` is already those rows.
    fn compact(&mut self, batch: RecordBatch) {
        self.batch = batch;
        self.runs.retain(|r| r.open);
        self.n_open = self.batch.num_rows();
    }
}

/// Columns of each decoded table dropped from its window table (batch-local row links).
const DROPPED: [(&str, &[&str]); 3] = [
    ("readings", &["message"]),
    ("messages", &["first_reading", "envelope"]),
    ("flows", &["envelope"]),
];

fn source_schema(table: &str) -> SchemaRef {
    match table {
        "readings" => crate::decode::readings_schema(),
        "messages" => crate::decode::messages_schema(),
        _ => crate::decode::flows_schema(),
    }
}

/// The schemas of the window tables `readings`, `messages` and `flows`: the
/// decoded tables without batch-local columns, plus `window_start` and `window_end`.
pub fn table_schemas() -> [(&'static str, SchemaRef); 3] {
    DROPPED.map(|(name, drop)| (name, TableBuffer::new(&source_schema(name), drop).schema))
}

impl TableBuffer {
    fn new(source: &Schema, drop: &[&str]) -> Self {
        let keep: Vec<usize> = (0..source.fields().len())
            .filter(|&i| !drop.contains(&source.field(i).name().as_str()))
            .collect();
        let mut fields: Vec<Field> = keep.iter().map(|&i| source.field(i).clone()).collect();
        let ts = DataType::Timestamp(TimeUnit::Millisecond, Some("UTC".into()));
        fields.push(Field::new("window_start", ts.clone(), false));
        fields.push(Field::new("window_end", ts, false));
        TableBuffer {
            schema: Arc::new(Schema::new(fields)),
            keep,
            kept: Kept::default(),
            pending: Vec::new(),
        }
    }

    /// Keeps only the columns named (and zeros in the others) from the next
    /// batch on; `None` keeps every column. `window_start` is always kept:
    /// closes find a row's window by it. `window_end` is only its start plus
    /// the window size, kept like any column when a file reads it (8 bytes a
    /// waiting row otherwise, a sixth of what the shipped files keep).
    fn read_only(&mut self, columns: Option<&std::collections::BTreeSet<String>>) {
        self.kept.read = columns.map(|c| {
            self.schema
                .fields()
                .iter()
                .map(|f| c.contains(f.name()) || f.name() == "window_start")
                .collect()
        });
    }

    /// Keeps the admitted rows of `batch`; `admitted[i]` says whether row i joins its window.
    fn push(&mut self, batch: &RecordBatch, admitted: Vec<bool>, size: Millis) {
        if !admitted.iter().any(|&a| a) {
            return;
        }
        let mask = BooleanArray::from(admitted);
        let batch = filter_record_batch(
            &batch.project(&self.keep).expect("kept columns exist"),
            &mask,
        )
        .expect("mask has the batch's length");
        let ts = column::<TimestampMillisecondArray>(&batch, "ts");
        let machine = column::<UInt32Array>(&batch, "machine_id");
        let start = TimestampMillisecondArray::from(
            ts.values()
                .iter()
                .map(|&t| window_start(t, size))
                .collect::<Vec<_>>(),
        )
        .with_timezone("UTC");
        let n = batch.num_rows();
        let mut cols: Vec<ArrayRef> = batch.columns().to_vec();
        cols.push(Arc::new(start.clone()));
        // Zeros (shared, no memory per row) where no file reads it.
        let zeros = self
            .kept
            .unread(cols.len())
            .then(|| self.kept.zeros.column(start.data_type(), n))
            .flatten();
        let end: ArrayRef = zeros.unwrap_or_else(|| {
            Arc::new(
                TimestampMillisecondArray::from_iter_values(
                    start.values().iter().map(|s| s + size),
                )
                .with_timezone("UTC"),
            )
        });
        cols.push(end);
        let cols = self.kept.columns(&cols, n, Arc::clone);
        let batch = RecordBatch::try_new(self.schema.clone(), cols).expect("window columns match");
        let runs = runs(machine.values(), start.values());
        self.pending.push(Pending {
            batch,
            min_start: runs.iter().map(|r| r.start).min().unwrap_or(Millis::MAX),
            runs,
            n_open: n,
        });
    }

    /// Takes out the rows whose window is closed by `clocks` (all rows when `all`).
    fn take(
        &mut self,
        clocks: &[Clock],
        size: Millis,
        all: bool,
        windows: &mut Vec<(u32, Millis)>,
    ) -> Table {
        let mut table = Table::new(self.schema.clone());
        // The furthest any machine has closed: a batch whose earliest open
        // window ends after it has nothing to give (checked per batch, so a
        // close costs the batches that can close, not every row waiting).
        let horizon = clocks
            .iter()
            .map(|c| c.closed_upto)
            .max()
            .unwrap_or(Millis::MIN);
        let Self { pending, kept, .. } = self;
        // The rows of a batch that `mask` marks.
        let mut rows_of = |batch: &RecordBatch, mask: &BooleanArray| {
            let cols = kept.columns(batch.columns(), mask.true_count(), |c| {
                arrow::compute::filter(c, mask).expect("mask has the batch's length")
            });
            RecordBatch::try_new(batch.schema(), cols).expect("filtered columns match")
        };
        for p in pending.iter_mut() {
            if !all && p.min_start.saturating_add(size) > horizon {
                continue;
            }
            let mut closed = 0;
            let mut min_start = Millis::MAX;
            for r in p.runs.iter_mut().filter(|r| r.open) {
                if all || r.start + size <= clocks[r.machine as usize].closed_upto {
                    r.open = false;
                    closed += r.rows;
                    // One entry a run (the caller sorts and dedups what is left).
                    let w = (r.machine, r.start);
                    if windows.last() != Some(&w) {
                        windows.push(w);
                    }
                } else {
                    min_start = min_start.min(r.start);
                }
            }
            p.min_start = min_start;
            if closed == 0 {
                continue;
            }
            p.n_open -= closed;
            if p.n_open == 0 {
                // Every row closed at once (the usual case): the batch as it is.
                table.parts.push(p.batch.clone());
                continue;
            }
            // Open rows are the runs still open; closed ones are those that
            // closed now (runs closed before were compacted away).
            table
                .parts
                .push(rows_of(&p.batch, &mask_of(&p.runs, |r| !r.open)));
            // The batch keeps only its open rows, so its closed ones are not
            // held twice (here and in the closed table) until the last of its
            // windows closes.
            let batch = rows_of(&p.batch, &mask_of(&p.runs, |r| r.open));
            p.compact(batch);
        }
        self.pending.retain(|p| p.n_open > 0);
        table
    }

    fn rows_waiting(&self) -> usize {
        self.pending.iter().map(|p| p.n_open).sum()
    }
}

fn column<'b, T: 'static>(batch: &'b RecordBatch, name: &str) -> &'b T {
    batch
        .column_by_name(name)
        .and_then(|c| c.as_any().downcast_ref::<T>())
        .expect("decoded tables have their documented columns")
}

/// Per-machine watermarks and the rows of windows still open.
pub struct Windows {
    cfg: WindowConfig,
    clocks: Vec<Clock>,
    flow_clocks: Vec<Clock>,
    readings: TableBuffer,
    messages: TableBuffer,
    flows: TableBuffer,
    /// Which group-bys of `readings` are summed up instead of kept as rows.
    grouping: groups::Grouping,
    /// Events that arrived after their window closed.
    pub late: u64,
    /// Events dated too far ahead of their arrival.
    pub future: u64,
}

impl Windows {
    pub fn new(cfg: WindowConfig) -> Self {
        Windows {
            cfg,
            clocks: Vec::new(),
            flow_clocks: Vec::new(),
            readings: TableBuffer::new(&source_schema("readings"), DROPPED[0].1),
            messages: TableBuffer::new(&source_schema("messages"), DROPPED[1].1),
            flows: TableBuffer::new(&source_schema("flows"), DROPPED[2].1),
            grouping: groups::Grouping::default(),
            late: 0,
            future: 0,
        }
    }

    /// Admits one event of `machine`: advances its watermark unless the event
    /// is future-dated, and says whether the event is late.
    pub fn admit(&mut self, machine: u32, ts: Millis, received_at: Millis) -> Admission {
        self.admit_to(false, machine, ts, received_at)
    }

    /// Admits one flow record of `machine` against the machine's flow watermark.
    pub fn admit_flow(&mut self, machine: u32, ts: Millis, received_at: Millis) -> Admission {
        self.admit_to(true, machine, ts, received_at)
    }

    fn admit_to(
        &mut self,
        flows: bool,
        machine: u32,
        ts: Millis,
        received_at: Millis,
    ) -> Admission {
        let cfg = &self.cfg;
        let clocks = if flows {
            &mut self.flow_clocks
        } else {
            &mut self.clocks
        };
        let i = machine as usize;
        if clocks.len() <= i {
            clocks.resize(i + 1, NO_CLOCK);
        }
        if ts > received_at.saturating_add(cfg.max_future) {
            self.future += 1;
            return Admission::Future;
        }
        let clock = &mut clocks[i];
        let admission = if ts < clock.closed_upto {
            self.late += 1;
            Admission::Late
        } else {
            Admission::OnTime
        };
        if ts > clock.newest {
            clock.newest = ts;
            let upto = window_start(ts - cfg.allowed_lateness, cfg.size);
            if upto != clock.closed_upto && !flows {
                self.grouping.advanced(machine);
            }
            clock.closed_upto = upto;
        }
        admission
    }

    /// The watermark of a machine (newest event time − allowed lateness), if it has one.
    pub fn watermark(&self, machine: u32) -> Option<Millis> {
        self.clocks
            .get(machine as usize)
            .filter(|c| c.newest != Millis::MIN)
            .map(|c| c.newest - self.cfg.allowed_lateness)
    }

    /// Keeps the on-time rows of a decoded batch until their windows close.
    /// `messages` and `flows` give the admission of each row of those tables.
    pub fn buffer(&mut self, batch: &DecodedBatch, messages: &[Admission], flows: &[Admission]) {
        let size = self.cfg.size;
        let on_time = |a: &Admission| *a == Admission::OnTime;
        let msg_of = column::<UInt32Array>(&batch.readings, "message");
        let mut readings: Vec<bool> = msg_of
            .values()
            .iter()
            .map(|&m| on_time(&messages[m as usize]))
            .collect();
        self.grouping
            .add(&batch.readings, &mut readings, &self.readings.keep, size);
        self.readings.push(&batch.readings, readings, size);
        self.messages.push(
            &batch.messages,
            messages.iter().map(on_time).collect(),
            size,
        );
        self.flows
            .push(&batch.flows, flows.iter().map(on_time).collect(), size);
    }

    /// Every machine-window closed by the watermarks since the last call.
    pub fn close(&mut self) -> Option<ClosedWindows> {
        self.take(false)
    }

    /// Closes every window still open (end of input).
    pub fn close_all(&mut self) -> Option<ClosedWindows> {
        self.take(true)
    }

    /// The per-machine clocks, for a snapshot. Rows of open windows are not
    /// kept: after a restart windows start empty.
    pub fn clocks(&self) -> (&[Clock], &[Clock]) {
        (&self.clocks, &self.flow_clocks)
    }

    /// Restores per-machine clocks (telemetry, flows) from a snapshot.
    pub fn restore_clocks(&mut self, clocks: Vec<Clock>, flow_clocks: Vec<Clock>) {
        self.clocks = clocks;
        self.flow_clocks = flow_clocks;
    }

    /// Keeps only the columns the query files read, per table (`readings`,
    /// `messages`, `flows`; a table missing from `columns` keeps everything),
    /// from the next batch on.
    pub fn read_only(
        &mut self,
        columns: &std::collections::BTreeMap<String, std::collections::BTreeSet<String>>,
    ) {
        self.readings.read_only(columns.get("readings"));
        self.messages.read_only(columns.get("messages"));
        self.flows.read_only(columns.get("flows"));
    }

    /// From the next window no row has reached yet, sums up these group-bys
    /// of `readings` as rows arrive and keeps no `readings` rows (none: keeps
    /// the rows again). The query stage says which ([`crate::features::RunOutput::grouping`]);
    /// windows already open finish as they began.
    pub fn group_readings(&mut self, specs: &[GroupSpec]) {
        if self.grouping.keep(specs, self.cfg.size) {
            tracing::info!(
                group_bys = specs.len(),
                "readings of the next windows {}",
                if specs.is_empty() {
                    "kept as rows"
                } else {
                    "summed up as they arrive (no rows kept)"
                }
            );
        }
    }

    /// Rows waiting in open windows (all tables), and groups of `readings`
    /// summed up in their stead.
    pub fn rows_waiting(&self) -> usize {
        self.readings.rows_waiting()
            + self.messages.rows_waiting()
            + self.flows.rows_waiting()
            + self.grouping.open()
    }

    fn take(&mut self, all: bool) -> Option<ClosedWindows> {
        let size = self.cfg.size;
        let mut windows = Vec::new();
        let readings = self.readings.take(&self.clocks, size, all, &mut windows);
        let messages = self.messages.take(&self.clocks, size, all, &mut windows);
        let flows = self.flows.take(&self.flow_clocks, size, all, &mut windows);
        let clocks = &self.clocks;
        let closed_upto = |m: u32| {
            clocks
                .get(m as usize)
                .map_or(Millis::MIN, |c| c.closed_upto)
        };
        let groups = self.grouping.close(&closed_upto, all, size, &mut windows);
        if windows.is_empty() {
            return None;
        }
        windows.sort_unstable();
        windows.dedup();
        let span = windows
            .iter()
            .map(|&(_, start)| (start, start.saturating_add(size)))
            .reduce(span_union)?;
        Some(ClosedWindows {
            readings,
            messages,
            flows,
            groups,
            machine_windows: windows.len(),
            span,
        })
    }
}
