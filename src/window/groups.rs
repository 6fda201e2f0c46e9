//! Groups of readings summed up as their rows arrive, instead of the rows.
//!
//! When every query file reads `readings` only through plain group-bys keyed
//! by machine and window (see `features::grouped`), the rows themselves are
//! never looked at: each group's row count, count, sum, Welford mean and
//! spread, least and greatest value are all a run needs. The window room then
//! keeps those, one entry per (machine, window, other keys), instead of the
//! rows — at 1 Hz and 10-second windows a tenth of the entries, at 10 Hz a
//! hundredth, and nothing per row to copy when a batch's windows close in
//! parts. A group's values are added in the order its rows arrive, which is
//! the order the query stage would add them in over the window table, so the
//! features are the same to the bit.
//!
//! Which group-bys to keep is decided by the query stage and comes back with
//! its runs ([`Grouping::keep`]); a change applies to windows that start
//! after every window seen so far, so no group is ever split between rows and
//! sums (the windows already open finish the way they began).

use std::collections::HashMap;
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray, Float64Array, TimestampMillisecondArray};
use arrow::buffer::NullBuffer;
use arrow::datatypes::{Float64Type, TimestampMillisecondType, UInt32Type};
use arrow::record_batch::RecordBatch;

use crate::time::{Millis, window_start};

/// What one kept group-by groups by and needs, in columns of the `readings`
/// window table. Its keys are always `machine` and the window, plus `names`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupSpec {
    /// Name columns keyed by besides `machine` (at most [`MAX_NAMES`]), ascending.
    pub names: Vec<usize>,
    /// The `value` column.
    pub value: usize,
    /// Columns that must not be NULL for a row to count, ascending.
    pub not_null: Vec<usize>,
    /// Whether the variance step is taken (only when some aggregate needs it:
    /// it costs a division a reading).
    pub welford: bool,
}

impl GroupSpec {
    /// Whether the two form the same groups (one set of sums serves both).
    pub fn same_groups(&self, other: &GroupSpec) -> bool {
        self.names == other.names && self.value == other.value && self.not_null == other.not_null
    }

    /// Whether sums kept for `self` give what a group-by that `wanted` needs.
    pub fn serves(&self, wanted: &GroupSpec) -> bool {
        self.same_groups(wanted) && (self.welford || !wanted.welford)
    }
}

/// Name keys besides `machine` a kept group-by may have.
pub const MAX_NAMES: usize = 3;

/// One group's running sums, updated as DataFusion's group accumulators
/// update theirs (the query stage's own group-bys use the same step).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Acc {
    /// Rows counted (those passing the `IS NOT NULL` filters).
    pub rows: u64,
    /// Values that were not NULL.
    pub count: u64,
    pub sum: f64,
    pub mean: f64,
    pub m2: f64,
    pub min: f64,
    pub max: f64,
}

impl Default for Acc {
    fn default() -> Self {
        Acc {
            rows: 0,
            count: 0,
            sum: 0.0,
            mean: 0.0,
            m2: 0.0,
            min: f64::NAN,
            max: f64::NAN,
        }
    }
}

impl Acc {
    /// Adds one value that is not NULL (the caller counts the row).
    #[inline]
    pub fn add(&mut self, v: f64, welford: bool) {
        self.count += 1;
        self.sum += v;
        if welford {
            // As DataFusion's variance accumulator updates, step for step.
            let delta1 = v - self.mean;
            self.mean += delta1 / self.count as f64;
            self.m2 += delta1 * (v - self.mean);
        }
        if self.count == 1 {
            self.min = v;
            self.max = v;
        } else {
            if v.total_cmp(&self.min).is_lt() {
                self.min = v;
            }
            if v.total_cmp(&self.max).is_gt() {
                self.max = v;
            }
        }
    }

    /// The variance over the values added; `None` with too few of them.
    pub fn variance(&self, sample: bool) -> Option<f64> {
        let n = if sample {
            self.count.saturating_sub(1)
        } else {
            self.count
        };
        (n > 0).then(|| self.m2 / n as f64)
    }
}

/// A group handed over when its window closed.
#[derive(Debug, Clone, Copy)]
pub struct ClosedGroup {
    /// The machine's name key (its id).
    pub machine: u32,
    pub start: Millis,
    /// Keys of [`GroupSpec::names`], in that order.
    pub names: [u32; MAX_NAMES],
    pub acc: Acc,
}

/// The groups of one kept group-by whose windows closed, ordered by machine,
/// window and keys (a query engine's group-by promises no order; results are
/// sorted after the run).
#[derive(Debug, Clone)]
pub struct ClosedGroups {
    pub spec: Arc<GroupSpec>,
    /// The window size (`window_end` is `start` plus it).
    pub size: Millis,
    /// The names behind the keys: `machine`'s, then each of `spec.names`'.
    pub names: Vec<ArrayRef>,
    pub groups: Vec<ClosedGroup>,
}

#[derive(Debug, Clone, Copy)]
struct Group {
    start: Millis,
    names: [u32; MAX_NAMES],
    acc: Acc,
}

/// A machine's open groups: few (metrics × open windows), found by a scan
/// that starts after the last one found (a message's readings come in the
/// same order each time); past [`SCAN_MAX`] they are indexed, so a sender of
/// thousands of metric names costs a hash lookup a reading, not a long scan.
#[derive(Debug, Default)]
struct Open {
    groups: Vec<Group>,
    next: usize,
    index: Option<Box<GroupIndex>>,
}

/// (window start, name keys) → position among a machine's groups.
type GroupIndex = HashMap<(Millis, [u32; MAX_NAMES]), u32, foldhash::fast::RandomState>;

const SCAN_MAX: usize = 32;

impl Open {
    #[inline]
    fn find(&mut self, start: Millis, names: [u32; MAX_NAMES]) -> &mut Acc {
        let n = self.groups.len();
        let is = |g: &Group| g.start == start && g.names == names;
        let found = if self.groups.get(self.next).is_some_and(is) {
            Some(self.next)
        } else {
            match &self.index {
                Some(index) => index.get(&(start, names)).map(|&i| i as usize),
                None => self.groups.iter().position(is),
            }
        };
        let i = found.unwrap_or_else(|| {
            self.groups.push(Group {
                start,
                names,
                acc: Acc::default(),
            });
            if let Some(index) = &mut self.index {
                index.insert((start, names), n as u32);
            } else if n + 1 > SCAN_MAX {
                self.reindex();
            }
            n
        });
        self.next = i + 1;
        &mut self.groups[i].acc
    }

    fn reindex(&mut self) {
        self.index = (self.groups.len() > SCAN_MAX).then(|| {
            Box::new(
                self.groups
                    .iter()
                    .enumerate()
                    .map(|(i, g)| ((g.start, g.names), i as u32))
                    .collect(),
            )
        });
    }

    /// Moves the groups of windows ending at or before `upto` to `out`.
    fn close(
        &mut self,
        machine: u32,
        upto: Option<Millis>,
        size: Millis,
        out: &mut Vec<ClosedGroup>,
    ) {
        let before = self.groups.len();
        self.groups.retain(|g| {
            let closed = upto.is_none_or(|u| g.start.saturating_add(size) <= u);
            if closed {
                out.push(ClosedGroup {
                    machine,
                    start: g.start,
                    names: g.names,
                    acc: g.acc,
                });
            }
            !closed
        });
        if self.groups.len() != before {
            self.next = 0;
            if self.index.is_some() {
                self.reindex();
            }
            if self.groups.is_empty() {
                // A machine that went quiet holds no room.
                self.groups = Vec::new();
            }
        }
    }
}

/// The open groups of one kept group-by.
#[derive(Debug)]
struct Groups {
    spec: Arc<GroupSpec>,
    /// Indexed by machine id.
    machines: Vec<Open>,
    /// The newest names of `machine` and each name key.
    names: Vec<Option<ArrayRef>>,
    open: usize,
}

impl Groups {
    fn new(spec: GroupSpec) -> Self {
        let names = vec![None; spec.names.len() + 1];
        Groups {
            spec: Arc::new(spec),
            machines: Vec::new(),
            names,
            open: 0,
        }
    }

    /// Adds the rows of `batch` that `take` marks (`starts`: each row's
    /// window). `col(i)` is the batch column of window-table column `i`.
    fn add(
        &mut self,
        batch: &RecordBatch,
        col: &dyn Fn(usize) -> Option<usize>,
        take: &[bool],
        starts: &[Millis],
    ) {
        let machine_col = batch
            .schema()
            .index_of("machine")
            .expect("readings have a machine column");
        let dict = |i: usize| batch.column(i).as_dictionary::<UInt32Type>();
        let mut name_cols = Vec::with_capacity(MAX_NAMES);
        for (k, i) in std::iter::once(Some(machine_col))
            .chain(self.spec.names.iter().map(|&i| col(i)))
            .enumerate()
        {
            let Some(i) = i else { return };
            let d = dict(i);
            // The interner only adds names: the longest list holds every key.
            if self.names[k]
                .as_ref()
                .is_none_or(|n| n.len() < d.values().len())
            {
                self.names[k] = Some(d.values().clone());
            }
            if k > 0 {
                name_cols.push(d.keys().values());
            }
        }
        let machines = dict(machine_col).keys().values();
        let Some(value) = col(self.spec.value) else {
            return;
        };
        let values: &Float64Array = batch.column(value).as_primitive::<Float64Type>();
        let value_nulls = values.nulls();
        let counted = self
            .spec
            .not_null
            .iter()
            .filter_map(|&i| col(i))
            .map(|i| batch.column(i).logical_nulls())
            .fold(None, |acc: Option<NullBuffer>, n| {
                NullBuffer::union(acc.as_ref(), n.as_ref())
            });
        let welford = self.spec.welford;
        for row in 0..batch.num_rows() {
            if !take[row] || counted.as_ref().is_some_and(|c| c.is_null(row)) {
                continue;
            }
            let m = machines[row] as usize;
            if self.machines.len() <= m {
                self.machines.resize_with(m + 1, Open::default);
            }
            let mut names = [0; MAX_NAMES];
            for (k, c) in name_cols.iter().enumerate() {
                names[k] = c[row];
            }
            let open = &mut self.machines[m];
            let before = open.groups.len();
            let acc = open.find(starts[row], names);
            acc.rows += 1;
            if value_nulls.is_none_or(|v| v.is_valid(row)) {
                acc.add(values.value(row), welford);
            }
            self.open += open.groups.len() - before;
        }
    }

    fn close(
        &mut self,
        machines: &[u32],
        closed_upto: &dyn Fn(u32) -> Millis,
        all: bool,
        size: Millis,
        windows: &mut Vec<(u32, Millis)>,
    ) -> Option<ClosedGroups> {
        let mut out = Vec::new();
        if all {
            for (m, open) in self.machines.iter_mut().enumerate() {
                open.close(m as u32, None, size, &mut out);
            }
        } else {
            for &m in machines {
                if let Some(open) = self.machines.get_mut(m as usize) {
                    open.close(m, Some(closed_upto(m)), size, &mut out);
                }
            }
        }
        if out.is_empty() {
            return None;
        }
        self.open -= out.len();
        out.sort_unstable_by_key(|g| (g.machine, g.start, g.names));
        for g in &out {
            // One entry a machine-window (sorted, so its groups are together).
            if windows.last() != Some(&(g.machine, g.start)) {
                windows.push((g.machine, g.start));
            }
        }
        Some(ClosedGroups {
            spec: self.spec.clone(),
            size,
            names: self
                .names
                .iter()
                .map(|n| {
                    n.clone().unwrap_or_else(|| {
                        arrow::array::new_empty_array(&arrow::datatypes::DataType::Utf8)
                    })
                })
                .collect(),
            groups: out,
        })
    }
}

/// From window start `from` on, rows go to `sets` (none: they are kept as rows).
#[derive(Debug)]
struct Era {
    from: Millis,
    sets: Vec<Groups>,
}

/// The group-bys kept as sums, and where rows go.
#[derive(Debug, Default)]
pub struct Grouping {
    /// In order of `from`; before the first, rows are kept.
    eras: Vec<Era>,
    /// The newest window start of any row seen.
    newest: Option<Millis>,
    /// Machines whose telemetry clock closed windows since the last close.
    advanced: Vec<u32>,
    /// Scratch of [`Grouping::add`], reused batch after batch: each row's
    /// window start, and the rows an era takes.
    starts: Vec<Millis>,
    take: Vec<bool>,
}

impl Grouping {
    /// From the next window that no row has reached yet, keeps these
    /// group-bys as sums and no rows (none: rows again). Says whether that
    /// is a change.
    pub fn keep(&mut self, specs: &[GroupSpec], size: Millis) -> bool {
        let current = self.eras.last().map_or(&[][..], |e| &e.sets[..]);
        if current.len() == specs.len() && current.iter().zip(specs).all(|(g, s)| *g.spec == *s) {
            return false;
        }
        let from = self.newest.map_or(Millis::MIN, |n| n.saturating_add(size));
        // An era no row has reached yet is replaced, not followed.
        if self.eras.last().is_some_and(|e| e.from >= from) {
            self.eras.pop();
        }
        self.eras.push(Era {
            from,
            sets: specs.iter().cloned().map(Groups::new).collect(),
        });
        true
    }

    /// Whether rows of some windows may go to sums.
    pub fn active(&self) -> bool {
        self.eras.iter().any(|e| !e.sets.is_empty())
    }

    /// Notes that `machine`'s telemetry clock closed windows.
    pub fn advanced(&mut self, machine: u32) {
        if self.active() {
            self.advanced.push(machine);
        }
    }

    /// Groups open.
    pub fn open(&self) -> usize {
        self.eras.iter().flat_map(|e| &e.sets).map(|g| g.open).sum()
    }

    /// Takes the rows of `batch` (a decoded `readings` table) that `admitted`
    /// marks and whose windows are kept as sums into their groups, and
    /// unmarks them. `keep[i]`: the batch column of window-table column `i`.
    pub fn add(
        &mut self,
        batch: &RecordBatch,
        admitted: &mut [bool],
        keep: &[usize],
        size: Millis,
    ) {
        let ts = batch
            .column_by_name("ts")
            .map(|c| c.as_primitive::<TimestampMillisecondType>())
            .expect("readings have a ts column");
        let ts: &TimestampMillisecondArray = ts;
        // The newest window reached (where a change of what is kept starts after).
        if let Some(newest) = ts
            .values()
            .iter()
            .zip(admitted.iter())
            .filter(|(_, a)| **a)
            .map(|(t, _)| *t)
            .max()
        {
            let newest = window_start(newest, size);
            self.newest = Some(self.newest.map_or(newest, |n| n.max(newest)));
        }
        if !self.active() {
            return;
        }
        // Rows of a message, and consecutive objects of an array, mostly
        // share a window: a division only when a row leaves the last one.
        let mut window = (Millis::MAX, Millis::MIN);
        let (mut starts, mut take) = (
            std::mem::take(&mut self.starts),
            std::mem::take(&mut self.take),
        );
        starts.clear();
        starts.extend(ts.values().iter().map(|&t| {
            if t < window.0 || t >= window.1 {
                let start = window_start(t, size);
                window = (start, start.saturating_add(size));
            }
            window.0
        }));
        let col = |i: usize| keep.get(i).copied();
        let mut until = Millis::MAX;
        for era in self.eras.iter_mut().rev() {
            let from = era.from;
            let range = from..until;
            until = from;
            if era.sets.is_empty() {
                continue;
            }
            take.clear();
            take.extend(
                starts
                    .iter()
                    .zip(admitted.iter())
                    .map(|(s, &a)| a && range.contains(s)),
            );
            if !take.iter().any(|&t| t) {
                continue;
            }
            for set in &mut era.sets {
                set.add(batch, &col, &take, &starts);
            }
            for (a, t) in admitted.iter_mut().zip(&take) {
                *a &= !t;
            }
        }
        (self.starts, self.take) = (starts, take);
    }

    /// The groups whose windows the clocks closed since the last call (all
    /// of them when `all`); each closed (machine, window) is added to `windows`.
    pub fn close(
        &mut self,
        closed_upto: &dyn Fn(u32) -> Millis,
        all: bool,
        size: Millis,
        windows: &mut Vec<(u32, Millis)>,
    ) -> Vec<ClosedGroups> {
        let mut machines = std::mem::take(&mut self.advanced);
        machines.sort_unstable();
        machines.dedup();
        let mut out = Vec::new();
        for era in &mut self.eras {
            for set in &mut era.sets {
                out.extend(set.close(&machines, closed_upto, all, size, windows));
            }
        }
        // Eras of sums before the last that hold no group are done with: a
        // row of their windows arriving later finds its window in the era
        // before, whole there (it had no group here). Eras of rows stay: rows
        // of their windows may be waiting.
        let last = self.eras.len().saturating_sub(1);
        let mut i = 0;
        self.eras.retain(|e| {
            i += 1;
            i - 1 == last || e.sets.is_empty() || e.sets.iter().any(|g| g.open > 0)
        });
        // Rows before the first era are kept anyway, and an era of rows
        // after another adds nothing: so the list stays as short as the
        // eras of sums still open, however often the files change.
        let mut rows_before = true;
        self.eras.retain(|e| {
            let rows = e.sets.is_empty();
            let keep = !(rows && rows_before);
            rows_before = rows;
            keep
        });
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A machine with more keys than a scan serves: the index finds the same
    /// groups a scan would, and goes away once few are left.
    #[test]
    fn many_groups_of_a_machine_are_indexed_and_found_again() {
        let mut open = Open::default();
        for round in 0..3 {
            for name in 0..100u32 {
                for start in [0, 10_000] {
                    let acc = open.find(start, [name, 0, 0]);
                    acc.rows += 1;
                    acc.add(f64::from(name) + f64::from(round), false);
                }
            }
        }
        assert_eq!(open.groups.len(), 200);
        assert!(open.index.is_some());
        let mut out = Vec::new();
        open.close(7, Some(10_000), 10_000, &mut out);
        assert_eq!(out.len(), 100, "the first window's groups");
        assert!(out.iter().all(|g| g.machine == 7 && g.start == 0));
        let g = out.iter().find(|g| g.names[0] == 42).unwrap();
        assert_eq!(
            (g.acc.rows, g.acc.sum, g.acc.min, g.acc.max),
            (3, 129.0, 42.0, 44.0)
        );
        assert_eq!(open.groups.len(), 100);
        assert!(open.index.is_some(), "100 left: still past a scan");
        // Found through the rebuilt index, not added again.
        open.find(10_000, [99, 0, 0]).rows += 1;
        assert_eq!(open.groups.len(), 100);
        out.clear();
        open.close(7, None, 10_000, &mut out);
        assert_eq!(out.len(), 100);
        assert_eq!(out.iter().find(|g| g.names[0] == 99).unwrap().acc.rows, 4);
        assert!(open.groups.is_empty() && open.index.is_none());
    }

    /// A change applies to windows no row has reached; eras of sums that
    /// hold nothing are let go, eras of rows are not.
    #[test]
    fn changes_apply_from_the_next_unseen_window() {
        let spec = GroupSpec {
            names: vec![6],
            value: 7,
            not_null: Vec::new(),
            welford: true,
        };
        let mut g = Grouping::default();
        assert!(!g.keep(&[], 10_000), "rows already");
        assert!(g.keep(std::slice::from_ref(&spec), 10_000));
        assert_eq!(g.eras[0].from, Millis::MIN, "nothing seen: at once");
        assert!(!g.keep(std::slice::from_ref(&spec), 10_000));
        g.newest = Some(20_000);
        assert!(g.keep(&[], 10_000));
        assert_eq!(g.eras.len(), 2);
        assert_eq!(g.eras[1].from, 30_000);
        // Replaced, not followed, while no row reached it.
        assert!(g.keep(&[spec.clone(), spec.clone()], 10_000));
        assert_eq!(g.eras.len(), 2);
        assert_eq!(g.eras[1].sets.len(), 2);
        g.newest = Some(40_000);
        assert!(g.keep(&[], 10_000));
        assert_eq!(
            g.eras.iter().map(|e| e.from).collect::<Vec<_>>(),
            [Millis::MIN, 30_000, 50_000]
        );
        let mut windows = Vec::new();
        let closed = g.close(&|_| Millis::MAX, false, 10_000, &mut windows);
        assert!(closed.is_empty() && windows.is_empty());
        // The empty eras of sums went, and with them the reason for the
        // era of rows: rows are kept before the first era anyway.
        assert!(g.eras.is_empty());
        assert!(!g.active());
        assert!(!g.keep(&[], 10_000), "rows already");
        // Switched on and off again and again, the list stays short.
        for k in 0..10 {
            g.newest = Some(60_000 + k * 20_000);
            assert!(g.keep(std::slice::from_ref(&spec), 10_000));
            g.newest = Some(70_000 + k * 20_000);
            assert!(g.keep(&[], 10_000));
            g.close(&|_| Millis::MAX, false, 10_000, &mut windows);
        }
        assert!(g.eras.is_empty(), "{:?}", g.eras.len());
    }
}
