//! Plain group-bys over `readings`, computed by twinwatch itself.
//!
//! Most feature files start the same way: group the window's readings by
//! names and window (`machine, window_start, metric`) and take `avg`, `min`,
//! `max`, `count`, `sum`, `stddev` or `var` of the `value`, perhaps only over
//! rows where some columns are not null. Such a group-by is the heaviest part of a run
//! (every reading of every closed window goes through it), and DataFusion
//! spends most of it hashing the name strings. The window tables already
//! carry each name as a 4-byte key, so this room groups by those keys and
//! hands DataFusion the groups: when a file is planned, every `Aggregate` of
//! that shape ([`Shape::of`]) is replaced by a scan of a table this module
//! fills before each run ([`Grouped::fill`]); the rest of the file (joins,
//! `CASE`, unions, outer group-bys) runs in DataFusion as written.
//!
//! The results are DataFusion's own to the last bit: the same accumulations in
//! the same row order (sums and Welford updates as its group accumulators
//! make them), the same NULLs (no value → NULL; one value → 0 for population
//! variance, NULL for sample variance), groups in first-seen order. An
//! aggregate of any other shape — a `DISTINCT`, a `FILTER`, an expression
//! argument, another table, a key that is not a name or window column — is
//! left to DataFusion untouched.
//!
//! When every use of `readings` in the active files is such a group-by keyed
//! by `machine` and a window column ([`Grouped::specs`]), the windows keep
//! each group's sums instead of its rows ([`crate::window::Windows::group_readings`]),
//! added as the rows arrive with the same step; [`Grouped::fill`] then takes
//! those groups (ordered by machine, window and keys) beside whatever rows
//! the run still holds.

use std::collections::HashMap;
use std::sync::Arc;

use arrow::array::{
    Array, ArrayRef, AsArray, DictionaryArray, Float64Array, Int64Array, TimestampMillisecondArray,
    UInt32Array,
};
use arrow::buffer::NullBuffer;
use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit, UInt32Type};
use arrow::record_batch::RecordBatch;
use datafusion::common::Column;
use datafusion::common::tree_node::{Transformed, TreeNode};
use datafusion::datasource::{MemTable, provider_as_source};
use datafusion::logical_expr::utils::split_conjunction;
use datafusion::logical_expr::{Expr, LogicalPlan, LogicalPlanBuilder, col};

use crate::window::{Acc, ClosedGroups, GroupSpec, MAX_NAMES, Table};

/// How a group key is read from the window table and shown to the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum KeyKind {
    /// A name column (4-byte dictionary keys), shown as strings (`Utf8View`).
    Name,
    /// `window_start` or `window_end` (ms, UTC).
    Time,
}

/// The aggregate functions computed here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Func {
    /// `count(value)`: values that are not NULL.
    Count,
    /// `count(*)`, `count(1)` or the count of a column that is never NULL.
    CountRows,
    Sum,
    Avg,
    Min,
    Max,
    VarPop,
    VarSamp,
    StddevPop,
    StddevSamp,
}

impl Func {
    fn named(name: &str) -> Option<Func> {
        Some(match name {
            "count" => Func::Count,
            "sum" => Func::Sum,
            "avg" => Func::Avg,
            "min" => Func::Min,
            "max" => Func::Max,
            "var_pop" => Func::VarPop,
            "var" | "var_samp" => Func::VarSamp,
            "stddev_pop" => Func::StddevPop,
            "stddev" | "stddev_samp" => Func::StddevSamp,
            _ => return None,
        })
    }

    /// Whether it needs the variance step.
    fn welford(self) -> bool {
        matches!(
            self,
            Func::VarPop | Func::VarSamp | Func::StddevPop | Func::StddevSamp
        )
    }

    fn output_type(self) -> DataType {
        match self {
            Func::Count | Func::CountRows => DataType::Int64,
            _ => DataType::Float64,
        }
    }
}

/// A group-by over the `readings` window table that this module can compute.
#[derive(Debug, Clone)]
pub(super) struct Shape {
    /// Columns of the window table grouped by, in the aggregate's order.
    keys: Vec<(usize, KeyKind)>,
    /// The aggregates, in order; all but `CountRows` read `value`.
    funcs: Vec<Func>,
    /// The `value` column of the window table.
    value: usize,
    /// Columns that must not be NULL for a row to count (the file's `WHERE`).
    not_null: Vec<usize>,
    /// The aggregate's output, with columns named `c0`, `c1`, ...
    schema: SchemaRef,
    /// The window table's `machine` and `window_end` columns.
    machine: usize,
    window_end: usize,
    /// What the windows sum up for it as rows arrive, when it is keyed by
    /// machine and window ([`crate::window::Windows::group_readings`]).
    spec: Option<GroupSpec>,
}

/// Most group keys handled here (a key packs four 32-bit codes).
const MAX_KEYS: usize = 4;

/// Where a column of some plan node comes from in the window table:
/// its index and whether it went through the name-to-string view.
type Source = (usize, bool);

impl Shape {
    /// The shape of `agg` when it is a plain group-by of the held `readings`
    /// table (`held`: its name in the plan), `None` otherwise.
    fn of(agg: &datafusion::logical_expr::Aggregate, held: &str, table: &Schema) -> Option<Shape> {
        let mut not_null = Vec::new();
        let source = |e: &Expr, not_null: &mut Vec<usize>| resolve(&agg.input, e, held, not_null);
        if agg.group_expr.is_empty() || agg.group_expr.len() > MAX_KEYS {
            return None;
        }
        let mut keys = Vec::new();
        for e in &agg.group_expr {
            let (i, viewed) = source(e, &mut not_null)?;
            let kind = match table.field(i).data_type() {
                t if *t == crate::decode::name_type() && viewed => KeyKind::Name,
                DataType::Timestamp(TimeUnit::Millisecond, _)
                    if matches!(
                        table.field(i).name().as_str(),
                        "window_start" | "window_end"
                    ) =>
                {
                    KeyKind::Time
                }
                _ => return None,
            };
            keys.push((i, kind));
        }
        let value = table.index_of("value").ok()?;
        let mut funcs = Vec::new();
        for e in &agg.aggr_expr {
            let e = match e {
                Expr::Alias(a) => a.expr.as_ref(),
                e => e,
            };
            let Expr::AggregateFunction(f) = e else {
                return None;
            };
            let p = &f.params;
            if p.distinct || p.filter.is_some() || !p.order_by.is_empty() || p.args.len() != 1 {
                return None;
            }
            let mut func = Func::named(f.func.name())?;
            match &p.args[0] {
                Expr::Literal(v, _) if func == Func::Count && !v.is_null() => {
                    func = Func::CountRows
                }
                arg => {
                    let (i, viewed) = source(arg, &mut not_null)?;
                    if viewed || i != value {
                        // Only the count of a column that is never NULL
                        // needs nothing of the column itself.
                        if func != Func::Count || table.field(i).is_nullable() {
                            return None;
                        }
                        func = Func::CountRows;
                    }
                }
            }
            funcs.push(func);
        }
        // The filters are gathered while resolving: every path from the
        // aggregate down to the scan is walked.
        not_null.sort_unstable();
        not_null.dedup();
        // The output must be what DataFusion's aggregate gives, type for type.
        let out = agg.schema.as_arrow();
        let expected = keys
            .iter()
            .map(|&(i, kind)| match kind {
                KeyKind::Name => DataType::Utf8View,
                KeyKind::Time => table.field(i).data_type().clone(),
            })
            .chain(funcs.iter().map(|f| f.output_type()));
        if out.fields().len() != keys.len() + funcs.len()
            || out
                .fields()
                .iter()
                .zip(expected)
                .any(|(f, t)| *f.data_type() != t)
        {
            return None;
        }
        let schema = Arc::new(Schema::new(
            out.fields()
                .iter()
                .enumerate()
                .map(|(i, f)| Field::new(format!("c{i}"), f.data_type().clone(), f.is_nullable()))
                .collect::<Vec<_>>(),
        ));
        let machine = table.index_of("machine").ok()?;
        let window_end = table.index_of("window_end").ok()?;
        let spec = Self::spec(&keys, &funcs, value, &not_null, machine);
        Some(Shape {
            keys,
            funcs,
            value,
            not_null,
            schema,
            machine,
            window_end,
            spec,
        })
    }

    /// The groups to sum up as rows arrive: keyed by `machine` and a window
    /// column, every other key a name.
    fn spec(
        keys: &[(usize, KeyKind)],
        funcs: &[Func],
        value: usize,
        not_null: &[usize],
        machine: usize,
    ) -> Option<GroupSpec> {
        let by_machine = keys.contains(&(machine, KeyKind::Name));
        let by_window = keys.iter().any(|&(_, k)| k == KeyKind::Time);
        if !(by_machine && by_window) {
            return None;
        }
        let mut names: Vec<usize> = keys
            .iter()
            .filter(|&&(i, k)| k == KeyKind::Name && i != machine)
            .map(|&(i, _)| i)
            .collect();
        names.sort_unstable();
        names.dedup();
        if names.len() > MAX_NAMES {
            return None;
        }
        Some(GroupSpec {
            names,
            value,
            not_null: not_null.to_vec(),
            welford: funcs.iter().any(|f| f.welford()),
        })
    }
}

/// The window-table column an expression of `plan`'s output names, following
/// it down through projections, aliases and filters to the scan of `held`.
/// The predicates of filters met on the way must be `IS NOT NULL` of window
/// columns: they are added to `not_null`. `None` for anything else.
fn resolve(plan: &LogicalPlan, e: &Expr, held: &str, not_null: &mut Vec<usize>) -> Option<Source> {
    let Expr::Column(c) = e else {
        return None;
    };
    let i = plan.schema().index_of_column(c).ok()?;
    match plan {
        LogicalPlan::TableScan(scan) => {
            if scan.table_name.table() != held || !scan.filters.is_empty() || scan.fetch.is_some() {
                return None;
            }
            let column = match &scan.projection {
                Some(p) => *p.get(i)?,
                None => i,
            };
            Some((column, false))
        }
        LogicalPlan::Projection(p) => {
            let mut e = p.expr.get(i)?;
            if let Expr::Alias(a) = e {
                e = &a.expr;
            }
            match e {
                Expr::Column(_) => resolve(&p.input, e, held, not_null),
                Expr::ScalarFunction(f)
                    if f.func.name() == super::views::NAME && f.args.len() == 1 =>
                {
                    let (column, viewed) = resolve(&p.input, &f.args[0], held, not_null)?;
                    (!viewed).then_some((column, true))
                }
                _ => None,
            }
        }
        LogicalPlan::SubqueryAlias(a) => {
            let (q, f) = a.input.schema().qualified_field(i);
            resolve(
                &a.input,
                &Expr::Column(Column::from((q, f))),
                held,
                not_null,
            )
        }
        LogicalPlan::Filter(f) => {
            for p in split_conjunction(&f.predicate) {
                let Expr::IsNotNull(inner) = p else {
                    return None;
                };
                let (column, _) = resolve(&f.input, inner, held, not_null)?;
                not_null.push(column);
            }
            resolve(&f.input, e, held, not_null)
        }
        _ => None,
    }
}

/// The group-bys of one file computed here, and the tables that stand in for them.
#[derive(Debug)]
pub(super) struct Grouped {
    /// The file's plan, with each such aggregate replaced by a scan.
    pub plan: LogicalPlan,
    /// Each replaced aggregate and the table its groups go to.
    groups: Vec<(Shape, Arc<MemTable>)>,
}

impl Grouped {
    /// `plan` with its plain group-bys over `readings` replaced, or `None`
    /// when it has none (or when the replaced plan does not check out).
    pub fn of(plan: &LogicalPlan, held: &str, table: &Schema) -> Option<Grouped> {
        let mut groups = Vec::new();
        let rewritten = plan
            .clone()
            .transform_up(|node| {
                let LogicalPlan::Aggregate(agg) = &node else {
                    return Ok(Transformed::no(node));
                };
                let Some(shape) = Shape::of(agg, held, table) else {
                    return Ok(Transformed::no(node));
                };
                let provider = Arc::new(MemTable::try_new(shape.schema.clone(), vec![vec![]])?);
                let name = format!("twinwatch_grouped_{}", groups.len());
                // The scan's columns renamed to the aggregate's own, so every
                // node above reads the same qualified names as before.
                let columns = agg.schema.iter().enumerate().map(|(i, (q, f))| {
                    col(Column::new(Some(name.as_str()), format!("c{i}")))
                        .alias_qualified(q.cloned(), f.name())
                });
                let scan =
                    LogicalPlanBuilder::scan(&name, provider_as_source(provider.clone()), None)?
                        .project(columns)?
                        .build()?;
                groups.push((shape, provider));
                Ok(Transformed::yes(scan))
            })
            .ok()?;
        if groups.is_empty() {
            return None;
        }
        // Nodes above keep the schemas computed for the aggregate; they must
        // still describe what they now get, and the file must give what it gave.
        let rewritten = rewritten
            .data
            .transform_up(|node| node.recompute_schema().map(Transformed::yes))
            .ok()?
            .data;
        if rewritten.schema().as_arrow().fields() != plan.schema().as_arrow().fields() {
            return None;
        }
        Some(Grouped {
            plan: rewritten,
            groups,
        })
    }

    /// What the windows may sum up as rows arrive for these group-bys;
    /// `None` when some of them cannot be (not keyed by machine and window).
    pub fn specs(&self) -> Option<Vec<GroupSpec>> {
        self.groups.iter().map(|(s, _)| s.spec.clone()).collect()
    }

    /// How many group-bys are computed here.
    pub fn count(&self) -> usize {
        self.groups.len()
    }

    /// Computes every replaced group-by over the rows of `readings`, takes
    /// the groups the windows summed up for it (`summed`), and puts them in
    /// its table for the next execution of [`Grouped::plan`]. `false` (the
    /// tables left empty) when some name key of the rows cannot be read as
    /// one set of names ([`aggregate`]): the run then takes the file's own plan.
    pub async fn fill(&self, readings: &Table, summed: &[ClosedGroups]) -> bool {
        for (shape, provider) in &self.groups {
            let mut batches = Vec::new();
            if !readings.parts.is_empty() {
                let Some(batch) = aggregate(shape, readings) else {
                    self.clear().await;
                    return false;
                };
                batches.push(batch);
            }
            if let Some(spec) = &shape.spec {
                for g in summed {
                    if g.spec.serves(spec) {
                        match from_sums(shape, g) {
                            Some(batch) => batches.push(batch),
                            None => tracing::warn!("summed groups without their names; left out"),
                        }
                    }
                }
            }
            *provider.batches[0].write().await = batches;
        }
        true
    }

    /// Empties the tables (the groups of a run are not held until the next).
    pub async fn clear(&self) {
        for (_, provider) in &self.groups {
            provider.batches[0].write().await.clear();
        }
    }
}

/// An aggregate's value from a group's sums (counts are read directly).
fn value(acc: &Acc, f: Func) -> Option<f64> {
    let some = acc.count > 0;
    match f {
        Func::Count | Func::CountRows => None,
        Func::Sum => some.then_some(acc.sum),
        Func::Avg => some.then(|| acc.sum / acc.count as f64),
        Func::Min => some.then_some(acc.min),
        Func::Max => some.then_some(acc.max),
        Func::VarPop => acc.variance(false),
        Func::VarSamp => acc.variance(true),
        Func::StddevPop => acc.variance(false).map(f64::sqrt),
        Func::StddevSamp => acc.variance(true).map(f64::sqrt),
    }
}

/// A key column of one part, as the codes that make up a group's key.
enum KeyColumn<'a> {
    /// Name keys: their own codes.
    Name(&'a [u32]),
    /// Times: coded by [`TimeCodes`].
    Time(&'a [i64]),
}

/// Dense codes for the distinct times of a key column (a run holds few
/// windows, and rows of one window come together).
#[derive(Default)]
struct TimeCodes {
    times: Vec<i64>,
    codes: HashMap<i64, u32, foldhash::fast::RandomState>,
    last: Option<(i64, u32)>,
}

impl TimeCodes {
    #[inline]
    fn code(&mut self, t: i64) -> u32 {
        if let Some((last, code)) = self.last
            && last == t
        {
            return code;
        }
        let code = *self.codes.entry(t).or_insert_with(|| {
            self.times.push(t);
            (self.times.len() - 1) as u32
        });
        self.last = Some((t, code));
        code
    }
}

/// Whether two names arrays give every key they both hold the same name:
/// the same array, or one an older copy of the other (the interner only adds
/// names). A name column no file read when its rows arrived holds
/// placeholders (key 0 for `""`, see [`crate::window`]), which is neither.
fn same_names(a: &ArrayRef, b: &ArrayRef) -> bool {
    let n = a.len().min(b.len());
    Arc::ptr_eq(a, b) || a.slice(0, n).as_ref() == b.slice(0, n).as_ref()
}

/// The groups of `shape` over the rows of `readings`, in first-seen order;
/// `None` when the parts of a name key do not share their names (the
/// groups of keys would not be the groups of names).
fn aggregate(shape: &Shape, readings: &Table) -> Option<RecordBatch> {
    let welford = shape.funcs.iter().any(|f| f.welford());
    // A group's key: the 32-bit code of each key column side by side (four
    // at most), hashed as one 128-bit word. Seeded per process: event times
    // are the sender's to choose.
    let mut index: HashMap<u128, u32, foldhash::fast::RandomState> = HashMap::default();
    let mut keys: Vec<u128> = Vec::new();
    let mut states: Vec<Acc> = Vec::new();
    let mut times: Vec<TimeCodes> = shape.keys.iter().map(|_| TimeCodes::default()).collect();
    // The names of each name key: the longest array of its parts, which
    // holds every key of the others (checked by `same_names`).
    let mut names: Vec<Option<ArrayRef>> = vec![None; shape.keys.len()];
    for part in &readings.parts {
        let mut columns: Vec<KeyColumn> = Vec::with_capacity(shape.keys.len());
        for (k, &(i, kind)) in shape.keys.iter().enumerate() {
            columns.push(match kind {
                KeyKind::Name => {
                    let d = part.column(i).as_dictionary::<UInt32Type>();
                    let held = names[k].get_or_insert_with(|| d.values().clone());
                    if !same_names(held, d.values()) {
                        return None;
                    }
                    if d.values().len() > held.len() {
                        *held = d.values().clone();
                    }
                    KeyColumn::Name(d.keys().values())
                }
                KeyKind::Time => KeyColumn::Time(
                    part.column(i)
                        .as_primitive::<arrow::datatypes::TimestampMillisecondType>()
                        .values(),
                ),
            });
        }
        let values = part
            .column(shape.value)
            .as_primitive::<arrow::datatypes::Float64Type>();
        let value_nulls = values.nulls();
        let counted = rows_counted(part, &shape.not_null);
        for row in 0..part.num_rows() {
            if counted.as_ref().is_some_and(|c| c.is_null(row)) {
                continue;
            }
            let mut key = 0u128;
            for (k, c) in columns.iter().enumerate() {
                let code = match c {
                    KeyColumn::Name(keys) => keys[row],
                    KeyColumn::Time(t) => times[k].code(t[row]),
                };
                key |= u128::from(code) << (32 * k);
            }
            let g = *index.entry(key).or_insert_with(|| {
                keys.push(key);
                states.push(Acc::default());
                (states.len() - 1) as u32
            });
            let s = &mut states[g as usize];
            s.rows += 1;
            if value_nulls.is_none_or(|v| v.is_valid(row)) {
                s.add(values.value(row), welford);
            }
        }
    }
    let code = |key: u128, k: usize| (key >> (32 * k)) as u32;
    let mut columns: Vec<ArrayRef> = Vec::new();
    for (k, &(_, kind)) in shape.keys.iter().enumerate() {
        columns.push(match kind {
            // As the view of the window table shows them: the names of the
            // keys, cast to string views.
            KeyKind::Name => match &names[k] {
                Some(names) => name_column(keys.iter().map(|&key| code(key, k)), names)?,
                None => arrow::array::new_empty_array(&DataType::Utf8View),
            },
            KeyKind::Time => Arc::new(
                TimestampMillisecondArray::from_iter_values(
                    keys.iter()
                        .map(|&key| times[k].times[code(key, k) as usize]),
                )
                .with_timezone("UTC"),
            ),
        });
    }
    Some(output(shape, columns, states.iter()))
}

/// Names of keys as the view of the window table shows them: the
/// dictionary of the keys over `names`, cast to string views.
fn name_column(codes: impl Iterator<Item = u32>, names: &ArrayRef) -> Option<ArrayRef> {
    let codes = UInt32Array::from_iter_values(codes);
    let dict = DictionaryArray::<UInt32Type>::try_new(codes, names.clone()).ok()?;
    arrow::compute::cast(&dict, &DataType::Utf8View).ok()
}

/// The aggregate's output: the key `columns`, then each function over the groups' sums.
fn output<'a>(
    shape: &Shape,
    mut columns: Vec<ArrayRef>,
    accs: impl Iterator<Item = &'a Acc> + Clone,
) -> RecordBatch {
    for &f in &shape.funcs {
        let accs = accs.clone();
        columns.push(match f {
            Func::Count => Arc::new(Int64Array::from_iter_values(accs.map(|s| s.count as i64))),
            Func::CountRows => Arc::new(Int64Array::from_iter_values(accs.map(|s| s.rows as i64))),
            f => Arc::new(Float64Array::from_iter(accs.map(|s| value(s, f)))),
        });
    }
    RecordBatch::try_new(shape.schema.clone(), columns)
        .expect("the groups are built to the aggregate's schema")
}

/// The groups the windows summed up for `shape`, as its output. Names come
/// from the decoded tables (never placeholders), so every key has its name.
fn from_sums(shape: &Shape, summed: &ClosedGroups) -> Option<RecordBatch> {
    let groups = &summed.groups;
    let spec = &summed.spec;
    let mut columns: Vec<ArrayRef> = Vec::new();
    for &(i, kind) in &shape.keys {
        columns.push(match kind {
            KeyKind::Name => {
                let (codes, names): (Vec<u32>, _) = if i == shape.machine {
                    (groups.iter().map(|g| g.machine).collect(), &summed.names[0])
                } else {
                    let k = spec.names.iter().position(|&n| n == i)?;
                    (
                        groups.iter().map(|g| g.names[k]).collect(),
                        summed.names.get(k + 1)?,
                    )
                };
                name_column(codes.into_iter(), names)?
            }
            KeyKind::Time => {
                let shift = if i == shape.window_end {
                    summed.size
                } else {
                    0
                };
                Arc::new(
                    TimestampMillisecondArray::from_iter_values(
                        groups.iter().map(|g| g.start + shift),
                    )
                    .with_timezone("UTC"),
                )
            }
        });
    }
    Some(output(shape, columns, groups.iter().map(|g| &g.acc)))
}

/// Which rows of `part` pass the `IS NOT NULL` filters (`None`: all of them).
fn rows_counted(part: &RecordBatch, not_null: &[usize]) -> Option<NullBuffer> {
    not_null
        .iter()
        .map(|&i| part.column(i).logical_nulls())
        .fold(None, |acc, n| NullBuffer::union(acc.as_ref(), n.as_ref()))
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use arrow::util::display::{ArrayFormatter, FormatOptions};
    use futures_util::StreamExt;

    use super::*;
    use crate::config::Config;
    use crate::features::Queries;
    use crate::pipeline::Pipeline;
    use crate::source::Envelope;
    use crate::window::ClosedWindows;

    const T0: i64 = 1_795_766_400_000;

    /// Windows of three machines, two devices each, readings `a`, `b`, `c`
    /// with NULLs and repeated values, arriving over many batches (so the
    /// window tables come in several parts) and closing in several runs.
    fn closed_windows() -> Vec<ClosedWindows> {
        let closed = windows_of(0, &[]);
        assert!(closed.len() > 2, "several runs");
        assert!(
            closed.iter().any(|c| c.readings.parts.len() > 1),
            "tables in parts"
        );
        closed
    }

    /// The windows of [`closed_windows`]' traffic, machine `m-i` running
    /// `i * skew` ms ahead of `m-0`; before batch `b` of each `(b, specs)`
    /// of `switches`, the windows are told to sum up `specs`.
    fn windows_of(skew: i64, switches: &[(i64, Vec<GroupSpec>)]) -> Vec<ClosedWindows> {
        let mut p = Pipeline::new(&Config::default());
        let mut closed = Vec::new();
        let mut x: u64 = 7;
        let mut next = || {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            x >> 33
        };
        for batch in 0..40 {
            for (_, specs) in switches.iter().filter(|(b, _)| *b == batch) {
                p.keep_for(&crate::features::RunOutput {
                    grouping: specs.clone(),
                    ..Default::default()
                });
            }
            let mut envelopes = Vec::new();
            for m in 0..3 {
                for d in 0..2 {
                    let ts = T0 + batch * 1_500 + d * 100 + m * skew;
                    let r = next();
                    let a = if r % 7 == 0 {
                        "null".to_string()
                    } else {
                        format!("{}", (r % 1000) as f64 / 8.0 - 40.0)
                    };
                    let b = if r % 5 == 0 {
                        "null".to_string()
                    } else {
                        format!("{}", (r % 3) as f64 * 1e9 + 0.1)
                    };
                    let payload = format!(
                        r#"{{"ts": {ts}, "device": "m{m}d{d}", "seq": {batch}, "readings": {{"a": {a}, "b": {b}, "c": {}}}}}"#,
                        r % 11
                    );
                    envelopes.push(Envelope::new(
                        format!("twin.telemetry.s.m-{m}"),
                        Some(ts),
                        payload,
                    ));
                }
            }
            closed.extend(p.process(&envelopes, 0).closed);
        }
        closed.extend(p.finish().closed);
        closed
    }

    /// The rows `plan` gives over `closed`, each as text (floats printed to
    /// round-trip), sorted.
    async fn rows(q: &Queries, plan: &LogicalPlan, closed: &ClosedWindows) -> Vec<String> {
        q.hold(Some(closed)).await;
        let state = q.ctx.state();
        let physical = state
            .query_planner()
            .create_physical_plan(plan, &state)
            .await
            .unwrap();
        let mut stream =
            datafusion::physical_plan::execute_stream(physical, q.ctx.task_ctx()).unwrap();
        let mut out = Vec::new();
        let options = FormatOptions::default().with_null("NULL");
        while let Some(batch) = stream.next().await {
            let batch = batch.unwrap();
            let formatters: Vec<_> = batch
                .columns()
                .iter()
                .map(|c| ArrayFormatter::try_new(c.as_ref(), &options).unwrap())
                .collect();
            for row in 0..batch.num_rows() {
                let cells: Vec<String> = formatters
                    .iter()
                    .map(|f| f.value(row).to_string())
                    .collect();
                out.push(cells.join(" | "));
            }
        }
        out.sort();
        out
    }

    /// A runtime for the tests' queries.
    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
    }

    /// A folder holding each of `files` as a features file (`f0.sql`, `f1.sql`, …).
    fn folder(files: &[&str]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        for (i, sql) in files.iter().enumerate() {
            std::fs::write(
                dir.path().join(format!("f{i}.sql")),
                format!("-- twinwatch: features\n{sql}"),
            )
            .unwrap();
        }
        dir
    }

    /// Runs `sql` both ways over every closed window; returns how many
    /// group-bys were computed here.
    fn compare(sql: &str) -> usize {
        let dir = folder(&[sql]);
        let windows = closed_windows();
        let rt = runtime();
        rt.block_on(async {
            let mut q = Queries::new(dir.path());
            assert!(q.reload().await.is_empty(), "{sql}");
            let file = &q.files["f0.sql"];
            let Some(g) = &file.grouped else {
                return 0;
            };
            for closed in &windows {
                let theirs = rows(&q, &file.plan, closed).await;
                assert!(g.fill(&closed.readings, &closed.groups).await, "{sql}");
                let ours = rows(&q, &g.plan, closed).await;
                assert!(!theirs.is_empty());
                assert_eq!(ours, theirs, "{sql}");
            }
            g.count()
        })
    }

    /// Runs `sql` over windows whose `readings` were summed up as they
    /// arrived (switched on, off and on again while machines' windows are
    /// open at different times) and over the same windows kept as rows, in
    /// DataFusion; the answers must be the same to the bit. Returns how many
    /// closed sets held sums only, and how many held both.
    fn compare_sums(sql: &str) -> (usize, usize) {
        let dir = folder(&[sql]);
        let rt = runtime();
        rt.block_on(async {
            let mut q = Queries::new(dir.path());
            assert!(q.reload().await.is_empty(), "{sql}");
            let specs = q.grouping().to_vec();
            assert!(!specs.is_empty(), "{sql}: summed up");
            let kept = windows_of(9_000, &[]);
            let sums = windows_of(
                9_000,
                &[(3, specs.clone()), (17, Vec::new()), (24, specs.clone())],
            );
            assert_eq!(kept.len(), sums.len());
            let file = &q.files["f0.sql"];
            let g = file.grouped.as_ref().unwrap();
            let (mut only, mut both) = (0, 0);
            for (r, s) in kept.iter().zip(&sums) {
                assert_eq!(r.machine_windows, s.machine_windows);
                assert_eq!(r.span, s.span);
                let theirs = rows(&q, &file.plan, r).await;
                assert!(g.fill(&s.readings, &s.groups).await, "{sql}");
                let ours = rows(&q, &g.plan, s).await;
                assert!(!theirs.is_empty());
                assert_eq!(ours, theirs, "{sql}");
                let summed = s.groups.iter().any(|g| !g.groups.is_empty());
                only += usize::from(summed && s.readings.num_rows() == 0);
                both += usize::from(summed && s.readings.num_rows() > 0);
            }
            (only, both)
        })
    }

    /// Every function this module computes, over every metric of each machine's window.
    const EVERY: &str = "SELECT machine, window_start, metric,
            count(value) AS c, count(*) AS n, count(machine) AS nm, sum(value) AS s,
            avg(value) AS a, min(value) AS lo, max(value) AS hi,
            var_pop(value) AS vp, var(value) AS vs, var_samp(value) AS vs2,
            stddev(value) AS sd, stddev_samp(value) AS sd2, stddev_pop(value) AS sp
        FROM readings GROUP BY machine, window_start, metric";

    /// Other name and window keys, in another order, with NULL filters.
    const OTHER_KEYS: &str =
        "SELECT device, window_end, machine, avg(value) AS a, stddev_pop(value) AS s
        FROM readings WHERE value IS NOT NULL AND device IS NOT NULL
        GROUP BY device, window_end, machine";

    /// Two group-bys of one file, one above the other.
    const TWO_GROUP_BYS: &str = "WITH s AS (SELECT machine, window_start, metric, max(value) AS hi
                    FROM readings GROUP BY machine, window_start, metric),
              t AS (SELECT machine, window_start, device, count(*) AS n
                    FROM readings GROUP BY machine, window_start, device)
         SELECT s.machine, s.window_start, max(hi) AS top, sum(n) AS n
         FROM s JOIN t ON s.machine = t.machine AND s.window_start = t.window_start
         GROUP BY s.machine, s.window_start";

    /// The shipped long-form file without its header line.
    fn shipped_stats() -> String {
        let shipped = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("queries/reading_stats.sql"),
        )
        .unwrap();
        shipped.lines().skip(1).collect::<Vec<_>>().join("\n")
    }

    fn filtered(sql: &str) -> String {
        sql.replace("GROUP BY", "WHERE value IS NOT NULL GROUP BY")
    }

    #[test]
    fn sums_of_readings_as_they_arrive_give_what_the_rows_give() {
        let (only, both) = compare_sums(EVERY);
        assert!(only > 0 && both > 0, "sums alone {only}, with rows {both}");
        compare_sums(&filtered(EVERY));
        compare_sums(OTHER_KEYS);
        compare_sums(&shipped_stats());
        compare_sums(TWO_GROUP_BYS);
    }

    /// Group-bys not keyed by machine and window, or a file that reads the
    /// rows some other way, keep the rows.
    #[test]
    fn rows_are_kept_unless_every_use_of_readings_can_be_summed() {
        let rt = runtime();
        let grouping = |files: &[&str]| {
            let dir = folder(files);
            rt.block_on(async {
                let mut q = Queries::new(dir.path());
                assert!(q.reload().await.is_empty(), "{files:?}");
                q.grouping().to_vec()
            })
        };
        let stats = "SELECT machine, window_start, metric, avg(value) AS a
                     FROM readings GROUP BY machine, window_start, metric";
        let spread = "SELECT machine, window_start, metric, stddev(value) AS s
                      FROM readings GROUP BY machine, window_start, metric";
        let both = grouping(&[stats, spread]);
        assert_eq!(both.len(), 1, "one sum serves both: {both:?}");
        assert!(both[0].welford);
        assert!(!grouping(&[stats])[0].welford);
        let messages = "SELECT machine, window_start, count(*) AS n FROM messages
                        GROUP BY machine, window_start";
        assert_eq!(grouping(&[stats, messages]).len(), 1);
        for other in [
            "SELECT machine, metric, avg(value) AS a FROM readings GROUP BY machine, metric",
            "SELECT machine, window_start, count(DISTINCT metric) AS a FROM readings
             GROUP BY machine, window_start",
            "SELECT machine, window_start, sum(payload_bytes) AS a FROM readings
             GROUP BY machine, window_start",
        ] {
            assert!(grouping(&[stats, other]).is_empty(), "{other}");
        }
    }

    #[test]
    fn every_function_gives_datafusions_result_to_the_bit() {
        assert_eq!(compare(EVERY), 1);
        assert_eq!(compare(&filtered(EVERY)), 1);
    }

    #[test]
    fn other_keys_and_nested_files() {
        assert_eq!(compare(OTHER_KEYS), 1);
        // The shipped long-form file: the group-by inside, the rest in DataFusion.
        assert_eq!(compare(&shipped_stats()), 1);
        assert_eq!(compare(TWO_GROUP_BYS), 2);
    }

    #[test]
    fn other_shapes_are_left_to_datafusion() {
        for sql in [
            "SELECT machine, count(DISTINCT metric) AS m FROM readings GROUP BY machine",
            "SELECT machine, avg(value * 2) AS a FROM readings GROUP BY machine",
            "SELECT machine, avg(value) AS a FROM readings WHERE value > 1 GROUP BY machine",
            "SELECT machine, avg(value) FILTER (WHERE value > 1) AS a FROM readings GROUP BY machine",
            "SELECT machine, sum(payload_bytes) AS b FROM readings GROUP BY machine",
            "SELECT machine, count(seq) AS b FROM readings GROUP BY machine",
            "SELECT machine, avg(value) AS a FROM readings GROUP BY machine, seq",
            "SELECT upper(machine) AS machine, avg(value) AS a FROM readings GROUP BY upper(machine)",
            "SELECT machine, avg(value) AS a FROM readings GROUP BY machine, device, metric, subject, window_start",
            "SELECT machine, count(*) AS n FROM messages GROUP BY machine",
        ] {
            assert_eq!(compare(sql), 0, "{sql}");
        }
    }

    /// A name column no file read while a window's first rows arrived holds
    /// placeholders there (key 0 for `""`): grouped by key, those rows would
    /// join the group of the name whose id is 0. Such a run takes the file's
    /// own plan, and gives what DataFusion gives.
    #[test]
    fn placeholder_names_in_early_parts_leave_the_run_to_datafusion() {
        use arrow::array::StringArray;
        let mut closed = closed_windows()
            .into_iter()
            .find(|c| c.readings.parts.len() > 1)
            .unwrap();
        let first = &closed.readings.parts[0];
        let device = first.schema().index_of("device").unwrap();
        let placeholder = DictionaryArray::<UInt32Type>::try_new(
            UInt32Array::from(vec![0; first.num_rows()]),
            Arc::new(StringArray::from(vec![""])),
        )
        .unwrap();
        let mut columns = first.columns().to_vec();
        columns[device] = Arc::new(placeholder);
        closed.readings.parts[0] = RecordBatch::try_new(first.schema(), columns).unwrap();

        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("f.sql"),
            "-- twinwatch: features\n\
             SELECT machine, window_start, 'd:' || device AS feature, avg(value) AS value\n\
             FROM readings GROUP BY machine, window_start, device",
        )
        .unwrap();
        let rt = runtime();
        let answers = |out: &crate::features::RunOutput| -> Vec<(String, String, i64, u64)> {
            out.features
                .iter()
                .map(|f| {
                    let (m, n) = (out.machine(f).to_string(), out.feature(f).to_string());
                    (m, n, f.ts, f.value.to_bits())
                })
                .collect()
        };
        let (on, off) = rt.block_on(async {
            let mut on = Queries::new(dir.path());
            let mut off = Queries::new(dir.path()).with_own_group_by(false);
            assert!(on.reload().await.is_empty() && off.reload().await.is_empty());
            let g = on.files["f.sql"].grouped.as_ref().unwrap();
            assert!(
                !g.fill(&closed.readings, &closed.groups).await,
                "placeholders are seen"
            );
            (on.run(&closed).await, off.run(&closed).await)
        });
        assert!(
            answers(&off).iter().any(|(_, n, _, _)| n == "f:d:"),
            "the placeholder rows form a group of their own: {:?}",
            answers(&off)
        );
        assert_eq!(answers(&on), answers(&off));
    }
}
