//! Features: the SQL files of the queries folder (`[queries] dir`, default
//! `queries/`), run by DataFusion over the tables of closed windows.
//!
//! Every `.sql` file declares its kind on its first line:
//!
//! - `-- twinwatch: features` — rows of `machine` plus numeric columns (wide),
//!   or `machine, feature, value` (long). Each feature gets the per-machine
//!   baselines of [`crate::detect`]; its alerts name the file and the feature
//!   (`feature = "<file>:<feature>"`).
//! - `-- twinwatch: rule severity=<level>` — every row is an alert of kind
//!   `rule`: `machine` (required), `value`, `score` (0..1) and `explanation`
//!   (optional).
//!
//! Optional `window_start` (or `ts`) columns give a row's event time;
//! otherwise the newest window end of the run stands in.
//!
//! The tables are `readings`, `messages` and `flows` (see [`crate::decode`]),
//! each with `window_start` and `window_end`. A run sees every machine-window
//! closed since the previous run — usually one window period live, several in
//! a fast replay — so queries group by `machine, window_start`.
//!
//! Each file is parsed, planned and optimized once, and re-planned only when
//! its content changes; a run swaps the tables' data and re-executes the
//! cached plans. Files are looked at again before every run: additions,
//! edits and removals take effect at the next window. A file that does not
//! parse or plan is refused with `file:line:column: message`, counted and
//! logged, and its previous version stays active. Nothing a query does at run
//! time (division by zero, NULLs, wrong types, huge results) stops the
//! pipeline: the error is logged for that file and that run.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arrow::array::{Array, ArrayRef, Float64Array, StringArray, TimestampMillisecondArray};
use arrow::compute::cast;
use arrow::datatypes::{DataType, TimeUnit};
use arrow::record_batch::RecordBatch;
use datafusion::datasource::{MemTable, ViewTable, provider_as_source};
use datafusion::logical_expr::LogicalPlan;
use datafusion::prelude::{SessionConfig, SessionContext};
use futures_util::StreamExt;
use tracing::{debug, info, warn};

use crate::score::Severity;
use crate::time::Millis;
use crate::window::{ClosedWindows, GroupSpec};

mod grouped;
mod views;

/// Most result rows one file may return per run; the rest is dropped (and logged).
pub const MAX_ROWS_PER_RUN: usize = 1_000_000;

/// What a query file produces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueryKind {
    Features,
    Rule { severity: Severity },
}

impl std::fmt::Display for QueryKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            QueryKind::Features => f.write_str("features"),
            QueryKind::Rule { severity } => write!(f, "rule severity={}", severity.as_str()),
        }
    }
}

/// A refused query file: where and why.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{file}:{line}:{column}: {message}")]
pub struct QueryError {
    pub file: String,
    pub line: u64,
    pub column: u64,
    pub message: String,
}

/// One feature value of one machine. The names are indices into the run's
/// [`RunNames`]: a run of 10,000 machines returns millions of rows, and two
/// strings per row were most of its memory and allocations.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FeatureRow {
    /// Index into [`RunNames::machines`].
    pub machine: u32,
    /// Index into [`RunNames::features`] (`<file>:<feature>`).
    pub feature: u32,
    pub value: f64,
    pub ts: Millis,
}

/// The names a run's feature rows point to. After a run both lists are
/// sorted, so comparing indices orders rows as comparing names would.
#[derive(Debug, Default)]
pub struct RunNames {
    pub machines: Vec<Arc<str>>,
    pub features: Vec<Arc<str>>,
}

/// A run's names, sorted, and for each id of `names` its index among them:
/// renumbering rows by it orders them as comparing the names would.
fn sorted_names(names: &crate::intern::Interner) -> (Vec<Arc<str>>, Vec<u32>) {
    let all = names.names();
    let mut order: Vec<u32> = (0..all.len() as u32).collect();
    order.sort_unstable_by(|&a, &b| all[a as usize].cmp(&all[b as usize]));
    let mut rank = vec![0u32; order.len()];
    for (new, &old) in order.iter().enumerate() {
        rank[old as usize] = new as u32;
    }
    let sorted = order.iter().map(|&old| all[old as usize].clone()).collect();
    (sorted, rank)
}

/// One row of a rule file.
#[derive(Debug, Clone, PartialEq)]
pub struct RuleRow {
    pub file: String,
    pub severity: Severity,
    pub machine: String,
    pub value: Option<f64>,
    pub score: Option<f64>,
    pub explanation: Option<String>,
    pub ts: Millis,
}

/// What one run produced: feature rows sorted by (ts, machine, feature), rule
/// rows by (ts, machine, file) — the order [`crate::pipeline::Pipeline::observe_features`] expects.
#[derive(Debug, Default)]
pub struct RunOutput {
    pub features: Vec<FeatureRow>,
    /// What the feature rows' indices name.
    pub names: RunNames,
    /// The columns of each window table that the active files read, for the
    /// windows to keep ([`crate::window::Windows::read_only`]).
    pub columns_read: BTreeMap<String, std::collections::BTreeSet<String>>,
    /// The group-bys of `readings` the windows may sum up as rows arrive,
    /// keeping no rows ([`crate::window::Windows::group_readings`]): every
    /// group-by of the active files over `readings` when each is computed
    /// here and keyed by machine and window, none otherwise.
    pub grouping: Vec<GroupSpec>,
    pub rules: Vec<RuleRow>,
    /// Files that failed at run time, with why.
    pub failures: Vec<(String, String)>,
    /// Time spent per file: planning, running, and taking its rows as they stream.
    pub timings: Vec<(String, Duration)>,
}

impl RunOutput {
    /// The machine a feature row is about.
    pub fn machine(&self, row: &FeatureRow) -> &str {
        &self.names.machines[row.machine as usize]
    }

    /// A feature row's name, `<file>:<feature>`.
    pub fn feature(&self, row: &FeatureRow) -> &str {
        &self.names.features[row.feature as usize]
    }
}

struct QueryFile {
    kind: QueryKind,
    text: String,
    /// The plan as DataFusion made it (what the file reads is found in it).
    plan: LogicalPlan,
    /// The plan run instead, when some of its group-bys are computed here.
    grouped: Option<grouped::Grouped>,
    columns: Vec<String>,
}

/// The queries folder, planned.
pub struct Queries {
    dir: PathBuf,
    ctx: SessionContext,
    tables: Vec<(&'static str, Arc<MemTable>)>,
    files: BTreeMap<String, QueryFile>,
    /// Refused file contents, so a bad file is reported once, not at every run.
    refused: BTreeMap<String, String>,
    /// Files refused so far (counter).
    pub refusals: u64,
    /// What the active files read ([`Queries::columns_read`]), worked out when they change.
    columns_read: BTreeMap<String, std::collections::BTreeSet<String>>,
    /// What the windows may sum up ([`RunOutput::grouping`]), worked out when the files change.
    grouping: Vec<GroupSpec>,
    /// Feature rows per machine-window in the last run: room is made for as
    /// many at the start of the next, times its machine-windows (windows of
    /// a plant are alike, and a run that folds several of them in gives
    /// rows for each), since results are taken as they stream and their
    /// count is known only at the end.
    feature_rows_hint: f64,
    /// Whether plain group-bys over `readings` are computed here ([`grouped`]).
    own_group_by: bool,
}

/// Prefix of the names the window tables are registered under as they are
/// held: name columns as dictionaries (4 bytes a row), the very arrays the
/// windows handed over. Files read the view of the plain name ([`as_views`]).
const HELD: &str = "twinwatch_held_";

fn held_name(name: &str) -> String {
    format!("{HELD}{name}")
}

/// The window table as the queries see it: a view over the held table whose
/// name columns are string views. DataFusion groups view columns column by
/// column; dictionary columns sent every GROUP BY through its row format, a
/// third of the query thread's time. The conversion (`names_as_views`, see
/// [`views`]) is part of each file's plan, so it runs a batch at a time as
/// the scan reads it, on the columns the file reads: a run never holds a
/// second, converted copy of its tables.
fn as_views(name: &str, held: &Arc<MemTable>) -> ViewTable {
    use datafusion::logical_expr::{LogicalPlanBuilder, ScalarUDF, col};
    let provider: Arc<dyn datafusion::catalog::TableProvider> = held.clone();
    let schema = provider.schema();
    let names_as_views = ScalarUDF::from(views::NamesAsViews::new());
    let columns = schema.fields().iter().map(|f| {
        // A Column, not a string: names are taken as they are, unparsed.
        let c = col(datafusion::common::Column::new_unqualified(f.name()));
        if *f.data_type() == crate::decode::name_type() {
            names_as_views.call(vec![c]).alias(f.name())
        } else {
            c
        }
    });
    let plan = LogicalPlanBuilder::scan(held_name(name), provider_as_source(provider), None)
        .and_then(|b| b.project(columns))
        .and_then(LogicalPlanBuilder::build)
        .expect("a projection of the table's own columns plans");
    ViewTable::new(plan, None)
}

fn context() -> SessionContext {
    let mut config = SessionConfig::new()
        .with_target_partitions(1)
        .with_information_schema(false);
    config.options_mut().sql_parser.collect_spans = true;
    SessionContext::new_with_config(config)
}

/// Parses the header line of a query file.
fn parse_header(file: &str, text: &str) -> Result<QueryKind, QueryError> {
    let first = text.lines().next().unwrap_or("").trim();
    let err = |message: String| QueryError {
        file: file.to_string(),
        line: 1,
        column: 1,
        message,
    };
    let Some(rest) = first
        .strip_prefix("--")
        .map(str::trim)
        .and_then(|r| r.strip_prefix("twinwatch:"))
    else {
        return Err(err(
            "the first line must declare the file: `-- twinwatch: features` or `-- twinwatch: rule severity=<level>`".into(),
        ));
    };
    let mut words = rest.split_whitespace();
    match words.next() {
        Some("features") => Ok(QueryKind::Features),
        Some("rule") => {
            let mut severity = Severity::Medium;
            for w in words {
                match w.strip_prefix("severity=") {
                    Some(s) => severity = s.parse().map_err(err)?,
                    None => {
                        return Err(err(format!(
                            "unknown rule setting `{w}` (expected severity=<level>)"
                        )));
                    }
                }
            }
            Ok(QueryKind::Rule { severity })
        }
        other => Err(err(format!(
            "unknown kind `{}` (expected `features` or `rule`)",
            other.unwrap_or("")
        ))),
    }
}

/// Finds `Line: N, Column: M` in a message (the SQL parser's way of saying where).
fn position_in_message(message: &str) -> Option<(u64, u64)> {
    let i = message.find("Line: ")?;
    let rest = &message[i + 6..];
    let line: u64 = rest
        .split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()?;
    let j = rest.find("Column: ")?;
    let column: u64 = rest[j + 8..]
        .split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()?;
    Some((line, column))
}

fn query_error(file: &str, text: &str, e: &datafusion::error::DataFusionError) -> QueryError {
    let message = e.to_string();
    // The parser gives no position when the text ends too early: point at its end.
    let end = || {
        let lines: Vec<&str> = text.trim_end().lines().collect();
        (
            lines.len().max(1) as u64,
            lines.last().map_or(0, |l| l.chars().count()) as u64 + 1,
        )
    };
    let span = e
        .diagnostic()
        .and_then(|d| d.span)
        .map(|s| (s.start.line, s.start.column))
        .filter(|(l, _)| *l > 0);
    let (line, column) = span
        .or_else(|| position_in_message(&message))
        .unwrap_or_else(|| {
            if message.contains("found: EOF") {
                end()
            } else {
                (1, 1)
            }
        });
    QueryError {
        file: file.to_string(),
        line,
        column,
        message: message.lines().next().unwrap_or("").to_string(),
    }
}

impl Queries {
    /// The queries of `dir` (which need not exist yet: files may be added later).
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        let ctx = context();
        let mut tables = Vec::new();
        for (name, schema) in crate::window::table_schemas() {
            let table =
                Arc::new(MemTable::try_new(schema, vec![vec![]]).expect("an empty table is valid"));
            ctx.register_table(held_name(name), table.clone())
                .expect("fresh context accepts the table");
            ctx.register_table(name, Arc::new(as_views(name, &table)))
                .expect("fresh context accepts the view");
            tables.push((name, table));
        }
        Queries {
            dir: dir.into(),
            ctx,
            tables,
            files: BTreeMap::new(),
            refused: BTreeMap::new(),
            refusals: 0,
            columns_read: BTreeMap::new(),
            grouping: Vec::new(),
            feature_rows_hint: 0.0,
            own_group_by: true,
        }
    }

    /// Whether plain group-bys over `readings` are computed by twinwatch
    /// (`queries.own_group_by`, on by default) or left to DataFusion; applies
    /// to files planned from now on.
    pub fn with_own_group_by(mut self, on: bool) -> Self {
        self.own_group_by = on;
        self
    }

    /// How many of a file's group-bys are computed by twinwatch (0 when the
    /// file is unknown or has none).
    pub fn own_group_bys(&self, file: &str) -> usize {
        self.files
            .get(file)
            .and_then(|f| f.grouped.as_ref())
            .map_or(0, grouped::Grouped::count)
    }

    /// The columns of each window table that the active files read (what the
    /// optimizer's projections and pushed-down filters name; a table scanned
    /// without a projection counts as read whole). Tables no file reads map to
    /// no columns.
    pub fn columns_read(&self) -> BTreeMap<String, std::collections::BTreeSet<String>> {
        self.columns_read.clone()
    }

    fn find_columns_read(&self) -> BTreeMap<String, std::collections::BTreeSet<String>> {
        use datafusion::common::tree_node::TreeNodeRecursion;
        let mut out: BTreeMap<String, std::collections::BTreeSet<String>> = self
            .tables
            .iter()
            .map(|(name, _)| (name.to_string(), Default::default()))
            .collect();
        for file in self.files.values() {
            let _ = file.plan.apply_with_subqueries(|node| {
                if let LogicalPlan::TableScan(scan) = node {
                    let schema = scan.source.schema();
                    // Plans are optimized, so the views are inlined: scans name the held tables.
                    let table = scan.table_name.table();
                    let table = table.strip_prefix(HELD).unwrap_or(table);
                    let set = out.entry(table.to_string()).or_default();
                    match &scan.projection {
                        Some(p) => set.extend(p.iter().map(|&i| schema.field(i).name().clone())),
                        None => set.extend(schema.fields().iter().map(|f| f.name().clone())),
                    }
                    for e in &scan.filters {
                        set.extend(e.column_refs().into_iter().map(|c| c.name.clone()));
                    }
                }
                Ok(TreeNodeRecursion::Continue)
            });
        }
        out
    }

    /// The group-bys the windows may sum up as rows arrive ([`RunOutput::grouping`]).
    pub fn grouping(&self) -> &[GroupSpec] {
        &self.grouping
    }

    fn find_grouping(&self) -> Vec<GroupSpec> {
        use datafusion::common::tree_node::TreeNodeRecursion;
        let held = held_name("readings");
        let mut specs: Vec<GroupSpec> = Vec::new();
        for file in self.files.values() {
            // The plan that runs must not read the rows themselves.
            let plan = file.grouped.as_ref().map_or(&file.plan, |g| &g.plan);
            let mut reads_rows = false;
            let _ = plan.apply_with_subqueries(|node| {
                if let LogicalPlan::TableScan(scan) = node
                    && scan.table_name.table() == held
                {
                    reads_rows = true;
                    return Ok(TreeNodeRecursion::Stop);
                }
                Ok(TreeNodeRecursion::Continue)
            });
            if reads_rows {
                return Vec::new();
            }
            let Some(grouped) = &file.grouped else {
                continue;
            };
            let Some(file_specs) = grouped.specs() else {
                return Vec::new();
            };
            for spec in file_specs {
                match specs.iter_mut().find(|s| s.same_groups(&spec)) {
                    Some(s) => s.welford |= spec.welford,
                    None => specs.push(spec),
                }
            }
        }
        specs
    }

    /// Names and kinds of the active files.
    pub fn active(&self) -> Vec<(String, QueryKind)> {
        self.files
            .iter()
            .map(|(n, f)| (n.clone(), f.kind))
            .collect()
    }

    /// Plans a query text; the error names the file, line and column.
    async fn plan(&self, file: &str, text: &str) -> Result<(QueryKind, LogicalPlan), QueryError> {
        let kind = parse_header(file, text)?;
        let state = self.ctx.state();
        let plan = state
            .create_logical_plan(text)
            .await
            .map_err(|e| query_error(file, text, &e))?;
        if matches!(
            plan,
            LogicalPlan::Ddl(_)
                | LogicalPlan::Dml(_)
                | LogicalPlan::Statement(_)
                | LogicalPlan::Copy(_)
        ) {
            return Err(QueryError {
                file: file.into(),
                line: 1,
                column: 1,
                message: "only queries (SELECT, WITH ...) are allowed".into(),
            });
        }
        let plan = state
            .optimize(&plan)
            .map_err(|e| query_error(file, text, &e))?;
        let columns: Vec<String> = plan
            .schema()
            .fields()
            .iter()
            .map(|f| f.name().clone())
            .collect();
        check_columns(file, kind, plan.schema().as_arrow())?;
        debug!(file, columns = ?columns, "query planned");
        Ok((kind, plan))
    }

    /// `plan` with its plain group-bys over `readings` computed here (see [`grouped`]).
    fn grouped(&self, plan: &LogicalPlan) -> Option<grouped::Grouped> {
        if !self.own_group_by {
            return None;
        }
        let (_, readings) = self.tables.iter().find(|(n, _)| *n == "readings")?;
        let schema = datafusion::catalog::TableProvider::schema(readings.as_ref());
        grouped::Grouped::of(plan, &held_name("readings"), &schema)
    }

    /// Looks at the folder: plans new and changed files, forgets removed ones.
    /// Returns the refusals of this look (each bad version is reported once).
    pub async fn reload(&mut self) -> Vec<QueryError> {
        let mut seen = Vec::new();
        let mut errors = Vec::new();
        let mut changed = false;
        let entries = match std::fs::read_dir(&self.dir) {
            Ok(e) => e.flatten().map(|e| e.path()).collect::<Vec<_>>(),
            Err(_) => Vec::new(),
        };
        let mut paths: Vec<PathBuf> = entries
            .into_iter()
            .filter(|p| p.extension().is_some_and(|e| e == "sql"))
            .collect();
        paths.sort();
        for path in paths {
            let name = path
                .file_name()
                .map(|n| n.to_string_lossy().to_string())
                .unwrap_or_default();
            let Ok(text) = std::fs::read_to_string(&path) else {
                continue;
            };
            seen.push(name.clone());
            if self.files.get(&name).is_some_and(|f| f.text == text)
                || self.refused.get(&name) == Some(&text)
            {
                continue;
            }
            match self.plan(&name, &text).await {
                Ok((kind, plan)) => {
                    let columns = plan
                        .schema()
                        .fields()
                        .iter()
                        .map(|f| f.name().clone())
                        .collect();
                    let grouped = self.grouped(&plan);
                    let replaced = self
                        .files
                        .insert(
                            name.clone(),
                            QueryFile {
                                kind,
                                text,
                                plan,
                                grouped,
                                columns,
                            },
                        )
                        .is_some();
                    self.refused.remove(&name);
                    changed = true;
                    info!(file = %name, %kind, "query {}", if replaced { "reloaded" } else { "loaded" });
                }
                Err(e) => {
                    self.refusals += 1;
                    let kept = self.files.contains_key(&name);
                    warn!(error = %e, previous_version_kept = kept, "query file refused");
                    self.refused.insert(name, text);
                    errors.push(e);
                }
            }
        }
        let gone: Vec<String> = self
            .files
            .keys()
            .filter(|n| !seen.contains(n))
            .cloned()
            .collect();
        changed |= !gone.is_empty();
        for name in gone {
            self.files.remove(&name);
            info!(file = %name, "query removed");
        }
        self.refused.retain(|n, _| seen.contains(n));
        if changed {
            self.columns_read = self.find_columns_read();
            self.grouping = self.find_grouping();
        }
        errors
    }

    /// Puts the closed windows' tables where the plans read them (`None`
    /// empties them: a run's rows are not held until the next).
    async fn hold(&self, closed: Option<&ClosedWindows>) {
        for (name, table) in &self.tables {
            let parts = closed.map_or_else(Vec::new, |c| {
                match *name {
                    "readings" => &c.readings,
                    "messages" => &c.messages,
                    _ => &c.flows,
                }
                .parts
                .clone()
            });
            *table.batches[0].write().await = parts;
        }
    }

    /// Runs every active file over the closed windows.
    pub async fn run(&mut self, closed: &ClosedWindows) -> RunOutput {
        let mut out = RunOutput::default();
        if self.files.is_empty() {
            return out;
        }
        self.hold(Some(closed)).await;
        let newest = closed.span.1;
        let mut names = Names::default();
        let state = self.ctx.state();
        let task = self.ctx.task_ctx();
        out.features.reserve_exact(
            (self.feature_rows_hint * closed.machine_windows as f64).ceil() as usize,
        );
        // Each file's result is taken a batch at a time as the plan yields it:
        // collected whole, a 10,000-machine run held every file's result
        // batches (string views of every feature name) beside the rows taken
        // from them.
        for (name, file) in &self.files {
            let started = Instant::now();
            let before = (out.features.len(), out.rules.len());
            let mut rows = 0;
            let result = async {
                let plan = match &file.grouped {
                    Some(g) if g.fill(&closed.readings, &closed.groups).await => &g.plan,
                    _ => &file.plan,
                };
                let physical = state
                    .query_planner()
                    .create_physical_plan(plan, &state)
                    .await?;
                let mut stream = datafusion::physical_plan::execute_stream(physical, task.clone())?;
                while let Some(batch) = stream.next().await {
                    let batch = batch?;
                    extract(name, file, &batch, &mut rows, newest, &mut names, &mut out)
                        .map_err(Failure::Extract)?;
                }
                Ok(())
            }
            .await;
            if let Some(g) = &file.grouped {
                g.clear().await;
            }
            out.timings.push((name.clone(), started.elapsed()));
            match result {
                Ok(()) => {}
                // A file that fails while it runs gives no rows at all, as
                // when its result was collected first.
                Err(Failure::Query(e)) => {
                    out.features.truncate(before.0);
                    out.rules.truncate(before.1);
                    out.failures.push((name.clone(), e));
                }
                // What was taken before the failure stands (as past the row cap).
                Err(Failure::Extract(e)) => out.failures.push((name.clone(), e)),
            }
        }
        self.feature_rows_hint = out.features.len() as f64 / closed.machine_windows.max(1) as f64;
        self.hold(None).await;
        for (file, why) in &out.failures {
            warn!(file = %file, "query failed on this window: {why}");
        }
        // Query engines return rows in no particular order: sorted here (on
        // the query stage's thread), the pipeline takes them as they come.
        // Names are renumbered in sorted order first, so sorting the indices
        // sorts by (ts, machine name, feature name).
        let (machines, machine_rank) = sorted_names(&names.machines);
        let (features, feature_rank) = sorted_names(&names.features);
        for r in &mut out.features {
            r.machine = machine_rank[r.machine as usize];
            r.feature = feature_rank[r.feature as usize];
        }
        out.names = RunNames { machines, features };
        out.columns_read = self.columns_read.clone();
        out.grouping = self.grouping.clone();
        out.features.sort_by_key(|r| (r.ts, r.machine, r.feature));
        out.rules
            .sort_by(|a, b| (a.ts, &a.machine, &a.file).cmp(&(b.ts, &b.machine, &b.file)));
        out
    }

    /// Checks every `.sql` file of `dir` against the table schemas.
    pub async fn check_dir(dir: &Path) -> Result<Vec<(String, QueryKind)>, Vec<QueryError>> {
        let mut q = Queries::new(dir);
        let errors = q.reload().await;
        if errors.is_empty() {
            Ok(q.active())
        } else {
            Err(errors)
        }
    }

    /// What a file computes: its kind, its output columns and its plan.
    pub async fn explain(path: &Path) -> Result<String, QueryError> {
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().to_string())
            .unwrap_or_default();
        let text = std::fs::read_to_string(path).map_err(|e| QueryError {
            file: path.display().to_string(),
            line: 1,
            column: 1,
            message: e.to_string(),
        })?;
        let q = Queries::new(path.parent().unwrap_or(Path::new(".")));
        let (kind, plan) = q.plan(&name, &text).await?;
        let mut s = format!("{name}: {kind}\n\noutput columns:\n");
        for f in plan.schema().fields() {
            s.push_str(&format!(
                "  {} {}{}\n",
                f.name(),
                f.data_type(),
                if f.is_nullable() { " (nullable)" } else { "" }
            ));
        }
        match kind {
            QueryKind::Features => {
                let features = feature_columns(plan.schema().as_arrow());
                if features.is_empty() {
                    s.push_str(
                        "\nlong form: one feature per row, named by `feature`, valued by `value`\n",
                    );
                } else {
                    s.push_str(&format!(
                        "\nfeatures per machine: {}\n",
                        features.join(", ")
                    ));
                }
            }
            QueryKind::Rule { severity } => {
                s.push_str(&format!(
                    "\nevery row raises a `rule` alert of severity {}\n",
                    severity.as_str()
                ));
            }
        }
        if let Some(g) = q.grouped(&plan) {
            s.push_str(&format!(
                "\ngroup-bys over readings computed by twinwatch on name keys: {}\n",
                g.count()
            ));
            if g.specs().is_some() {
                s.push_str(
                    "each keyed by machine and window: summed up as readings arrive \
                     (no rows kept) when every file reads readings only so\n",
                );
            }
        }
        s.push_str(&format!("\nplan:\n{}\n", plan.display_indent()));
        Ok(s)
    }
}

/// Room for `n` more rows, made a quarter at a time past what the run
/// started with: doubling left up to half of a 10,000-machine run's rows
/// (35 MB) unused at the peak.
fn make_room(rows: &mut Vec<FeatureRow>, n: usize) {
    if rows.capacity() - rows.len() < n {
        rows.reserve_exact(n.max(rows.len() / 4));
    }
}

fn is_numeric(t: &DataType) -> bool {
    t.is_numeric()
}

/// Wide-form feature columns: every numeric column but the time columns.
fn feature_columns(schema: &arrow::datatypes::Schema) -> Vec<String> {
    schema
        .fields()
        .iter()
        .filter(|f| {
            is_numeric(f.data_type())
                && !["window_start", "window_end", "ts"].contains(&f.name().as_str())
        })
        .map(|f| f.name().clone())
        .collect()
}

fn check_columns(
    file: &str,
    kind: QueryKind,
    schema: &arrow::datatypes::Schema,
) -> Result<(), QueryError> {
    let err = |message: String| QueryError {
        file: file.into(),
        line: 1,
        column: 1,
        message,
    };
    if schema.field_with_name("machine").is_err() {
        return Err(err("the query must return a `machine` column".into()));
    }
    if let QueryKind::Features = kind {
        let long =
            schema.field_with_name("feature").is_ok() && schema.field_with_name("value").is_ok();
        if !long && feature_columns(schema).is_empty() {
            return Err(err(
                "a features query returns numeric feature columns, or `feature` and `value` columns".into(),
            ));
        }
    }
    Ok(())
}

fn strings(batch: &RecordBatch, name: &str) -> Result<Option<StringArray>, String> {
    let Some(c) = batch.column_by_name(name) else {
        return Ok(None);
    };
    let c = cast(c, &DataType::Utf8).map_err(|e| format!("column `{name}` is not text: {e}"))?;
    Ok(c.as_any().downcast_ref::<StringArray>().cloned())
}

/// A text column whose rows are read as interned ids, each distinct text
/// interned once per batch rather than on every row: a run's machine and
/// feature names repeat row after row, and interning (with the feature's
/// `<file>:` prefix written first) was a seventh of the query thread's time.
/// Query engines hand text back as views, and a view holds a string of 12
/// bytes or less whole (its length and bytes), so such a view is its own
/// key, cheaper to look up than its text (reading_stats.sql 6.4–6.7 ms a
/// window against 6.8–8.2 ms keyed by text alone, `cargo bench --bench
/// queries`); longer text is looked up by its string. Other text types are
/// cast to plain strings, as before.
struct NameColumn {
    array: Texts,
    short: foldhash::HashMap<u128, u32>,
    long: foldhash::HashMap<Box<str>, u32>,
}

/// The longest string a view holds whole.
const INLINE_VIEW: u32 = 12;

enum Texts {
    Views(arrow::array::StringViewArray),
    Text(StringArray),
}

impl Texts {
    fn is_null(&self, i: usize) -> bool {
        match self {
            Texts::Views(a) => a.is_null(i),
            Texts::Text(a) => a.is_null(i),
        }
    }

    /// Row `i`'s text (not null).
    fn value(&self, i: usize) -> &str {
        match self {
            Texts::Views(a) => a.value(i),
            Texts::Text(a) => a.value(i),
        }
    }
}

impl NameColumn {
    fn of(batch: &RecordBatch, name: &str) -> Result<Option<NameColumn>, String> {
        let Some(c) = batch.column_by_name(name) else {
            return Ok(None);
        };
        let array = match c.as_any().downcast_ref::<arrow::array::StringViewArray>() {
            Some(views) => Texts::Views(views.clone()),
            None => match strings(batch, name)? {
                Some(text) => Texts::Text(text),
                None => return Ok(None),
            },
        };
        Ok(Some(NameColumn {
            array,
            short: Default::default(),
            long: Default::default(),
        }))
    }

    fn is_null(&self, i: usize) -> bool {
        self.array.is_null(i)
    }

    /// Row `i`'s text (not null).
    fn value(&self, i: usize) -> &str {
        self.array.value(i)
    }

    /// The id of row `i`'s text (not null): as `intern` says the first time
    /// the text is met, as it said then after that.
    fn id(&mut self, i: usize, intern: impl FnOnce(&str) -> u32) -> u32 {
        if let Texts::Views(a) = &self.array {
            let view = a.views()[i];
            if view as u32 <= INLINE_VIEW {
                return *self.short.entry(view).or_insert_with(|| intern(a.value(i)));
            }
        }
        let text = self.array.value(i);
        if let Some(&id) = self.long.get(text) {
            return id;
        }
        let id = intern(text);
        self.long.insert(text.into(), id);
        id
    }
}

fn floats(batch: &RecordBatch, name: &str) -> Result<Option<Float64Array>, String> {
    let Some(c) = batch.column_by_name(name) else {
        return Ok(None);
    };
    let c: ArrayRef =
        cast(c, &DataType::Float64).map_err(|e| format!("column `{name}` is not numeric: {e}"))?;
    Ok(c.as_any().downcast_ref::<Float64Array>().cloned())
}

fn times(batch: &RecordBatch) -> Option<TimestampMillisecondArray> {
    ["ts", "window_start"].iter().find_map(|name| {
        let c = batch.column_by_name(name)?;
        let c = cast(c, &DataType::Timestamp(TimeUnit::Millisecond, None)).ok()?;
        c.as_any()
            .downcast_ref::<TimestampMillisecondArray>()
            .cloned()
    })
}

fn value_at(a: &Option<Float64Array>, i: usize) -> Option<f64> {
    a.as_ref()
        .filter(|a| a.is_valid(i))
        .map(|a| a.value(i))
        .filter(|v| v.is_finite())
}

/// The names of one run's rows while they are extracted (uncapped: a run is
/// bounded by [`MAX_ROWS_PER_RUN`]).
struct Names {
    machines: crate::intern::Interner,
    features: crate::intern::Interner,
    /// Scratch for `<file>:<feature>`, so a row costs no allocation.
    key: String,
}

impl Default for Names {
    fn default() -> Self {
        Names {
            machines: crate::intern::Interner::new(usize::MAX),
            features: crate::intern::Interner::new(usize::MAX),
            key: String::new(),
        }
    }
}

impl Names {
    fn machine(&mut self, name: &str) -> u32 {
        self.machines
            .intern(name)
            .expect("an uncapped interner takes every name")
    }

    fn feature(&mut self, stem: &str, feature: &str) -> u32 {
        use std::fmt::Write;
        self.key.clear();
        let _ = write!(self.key, "{stem}:{feature}");
        self.features
            .intern(&self.key)
            .expect("an uncapped interner takes every name")
    }
}

/// Why a file's run ended early.
enum Failure {
    /// Planning or executing it failed.
    Query(String),
    /// Its result could not be read as features or rules.
    Extract(String),
}

impl From<datafusion::error::DataFusionError> for Failure {
    fn from(e: datafusion::error::DataFusionError) -> Self {
        Failure::Query(e.to_string())
    }
}

/// Turns one batch of a file's result into feature or rule rows; `rows`
/// counts the rows taken from the file so far.
fn extract(
    name: &str,
    file: &QueryFile,
    batch: &RecordBatch,
    rows: &mut usize,
    newest: Millis,
    names: &mut Names,
    out: &mut RunOutput,
) -> Result<(), String> {
    let stem = name.strip_suffix(".sql").unwrap_or(name);
    if *rows >= MAX_ROWS_PER_RUN {
        return Err(format!(
            "more than {MAX_ROWS_PER_RUN} rows; the rest of this run's result is dropped"
        ));
    }
    let take = batch.num_rows().min(MAX_ROWS_PER_RUN - *rows);
    *rows += take;
    let mut machine = NameColumn::of(batch, "machine")?.ok_or("no `machine` column")?;
    let ts = times(batch);
    let ts_at = |i: usize| {
        ts.as_ref()
            .filter(|t| t.is_valid(i))
            .map_or(newest, |t| t.value(i))
    };
    match file.kind {
        QueryKind::Features => {
            let long = (NameColumn::of(batch, "feature")?, floats(batch, "value")?);
            if let (Some(mut feature), value) = long
                && value.is_some()
            {
                make_room(&mut out.features, take);
                for i in 0..take {
                    if machine.is_null(i) || feature.is_null(i) {
                        continue;
                    }
                    if let Some(v) = value_at(&value, i) {
                        out.features.push(FeatureRow {
                            machine: machine.id(i, |m| names.machine(m)),
                            feature: feature.id(i, |f| names.feature(stem, f)),
                            value: v,
                            ts: ts_at(i),
                        });
                    }
                }
            } else {
                let cols: Vec<(u32, Option<Float64Array>)> = file
                    .columns
                    .iter()
                    .filter(|c| feature_columns(batch.schema().as_ref()).contains(c))
                    .map(|c| Ok((names.feature(stem, c), floats(batch, c)?)))
                    .collect::<Result<_, String>>()?;
                make_room(&mut out.features, take * cols.len());
                for i in 0..take {
                    if machine.is_null(i) {
                        continue;
                    }
                    let m = machine.id(i, |m| names.machine(m));
                    for (feature, values) in &cols {
                        if let Some(v) = value_at(values, i) {
                            out.features.push(FeatureRow {
                                machine: m,
                                feature: *feature,
                                value: v,
                                ts: ts_at(i),
                            });
                        }
                    }
                }
            }
        }
        QueryKind::Rule { severity } => {
            let value = floats(batch, "value")?;
            let score = floats(batch, "score")?;
            let explanation = strings(batch, "explanation")?;
            for i in 0..take {
                if machine.is_null(i) {
                    continue;
                }
                out.rules.push(RuleRow {
                    file: name.to_string(),
                    severity,
                    machine: machine.value(i).to_string(),
                    value: value_at(&value, i),
                    score: value_at(&score, i).map(|s| s.clamp(0.0, 1.0)),
                    explanation: explanation
                        .as_ref()
                        .filter(|e| e.is_valid(i))
                        .map(|e| e.value(i).to_string()),
                    ts: ts_at(i),
                });
            }
        }
    }
    Ok(())
}

/// Closed windows waiting for a query run: a run is due once they span
/// `queries.every` of event time (or once `queries.max_rows` rows have
/// gathered), so a fast replay does not pay the query engine's fixed cost for
/// every small batch of closed windows, and the grouping — hence the results —
/// depends on the data, not on the wall clock.
struct Gather {
    pending: Vec<ClosedWindows>,
    rows: usize,
    every: Millis,
    max_rows: usize,
}

impl Gather {
    fn new(cfg: &crate::config::QueriesConfig) -> Self {
        Gather {
            pending: Vec::new(),
            rows: 0,
            every: cfg.every.max(0),
            max_rows: cfg.max_rows,
        }
    }

    /// The rows a set of closed windows counts for. Readings summed up as
    /// they arrived count as the rows they were (every kept group-by sums the
    /// same rows: one counts), so runs come at the same pace whether the
    /// windows keep rows or sums.
    fn rows_of(c: &ClosedWindows) -> usize {
        let summed: u64 = c
            .groups
            .first()
            .map_or(0, |g| g.groups.iter().map(|g| g.acc.rows).sum());
        c.readings.num_rows() + c.messages.num_rows() + c.flows.num_rows() + summed as usize
    }

    fn offer(&mut self, closed: Option<ClosedWindows>) {
        if let Some(c) = closed {
            self.rows += Self::rows_of(&c);
            self.pending.push(c);
        }
    }

    /// Drops the oldest gathered windows until at most `keep` rows are left
    /// (the newest set always stays); the machine-windows dropped.
    fn shed_oldest(&mut self, keep: usize) -> usize {
        let (mut n, mut shed) = (0, 0);
        while n + 1 < self.pending.len() && self.rows > keep {
            self.rows -= Self::rows_of(&self.pending[n]);
            shed += self.pending[n].machine_windows;
            n += 1;
        }
        self.pending.drain(..n);
        shed
    }

    fn due(&self) -> bool {
        !self.pending.is_empty()
            && (self.rows >= self.max_rows
                || self
                    .pending
                    .iter()
                    .map(|c| c.span)
                    .reduce(crate::window::span_union)
                    .is_some_and(|(lo, hi)| hi - lo >= self.every))
    }

    /// Everything gathered, as one set of tables.
    fn take(&mut self) -> Option<ClosedWindows> {
        if self.pending.is_empty() {
            return None;
        }
        self.rows = 0;
        Some(merge(std::mem::take(&mut self.pending)))
    }
}

/// The name of the thread the query files run on (see [`FeatureStage::spawn`]).
pub const QUERY_THREAD: &str = "twinwatch-queries";

/// The feature stage of a run, in line: the caller waits for each query run
/// (`replay`, `demo`, `eval`: the alerts come out in input order, so a
/// replay is deterministic). [`FeatureStage::spawn`] moves it to a thread of its
/// own for `run`.
pub struct FeatureStage {
    gather: Gather,
    queries: Queries,
    /// Runs so far, and their total time.
    pub runs: u64,
    pub busy: Duration,
}

/// Lowers the calling thread's scheduling priority (nice 10), so the query
/// runs take the CPU the ingest loop leaves: on a box with as many busy
/// threads as cores, a run that computes for tens of milliseconds otherwise
/// delays the alerts of the batches behind it. Query features come from
/// 10-second windows; a few milliseconds more for them cost nothing.
fn yield_to_ingest() {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: gettid and setpriority take no pointers; on Linux
        // PRIO_PROCESS with a thread id sets that thread's nice value alone.
        let r = unsafe {
            let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
            libc::setpriority(libc::PRIO_PROCESS, tid, 10)
        };
        if r != 0 {
            tracing::debug!(error = %std::io::Error::last_os_error(), "query thread keeps its priority");
        }
    }
}

impl FeatureStage {
    pub fn new(cfg: &crate::config::QueriesConfig) -> Self {
        FeatureStage {
            gather: Gather::new(cfg),
            queries: Queries::new(&cfg.dir).with_own_group_by(cfg.own_group_by),
            runs: 0,
            busy: Duration::ZERO,
        }
    }

    /// Plans the files now, as the first run would, and hands back the
    /// queries as planned: what they read ([`Queries::columns_read`]) and
    /// which group-bys the windows may sum ([`Queries::grouping`]) are then
    /// known before the first row arrives. Until a first run answered, the
    /// windows kept every column and every reading as a row: at 10,000
    /// machines, 60–90 MB of a start's peak.
    pub async fn plan_ahead(&mut self) -> &Queries {
        self.queries.reload().await;
        &self.queries
    }

    /// Gathers the windows a batch closed.
    pub fn offer(&mut self, closed: Option<ClosedWindows>) {
        self.gather.offer(closed);
    }

    /// Whether a run is due.
    pub fn due(&self) -> bool {
        self.gather.due()
    }

    /// Looks at the folder again and runs every file over the gathered windows.
    pub async fn run(&mut self) -> Option<RunOutput> {
        let closed = self.gather.take()?;
        Some(self.run_on(&closed).await)
    }

    async fn run_on(&mut self, closed: &ClosedWindows) -> RunOutput {
        let started = Instant::now();
        self.queries.reload().await;
        let out = self.queries.run(closed).await;
        self.runs += 1;
        self.busy += started.elapsed();
        out
    }

    /// Moves the query runs to a thread of their own (with its own
    /// single-threaded runtime: a query engine that computes for a while
    /// without yielding must not hold a worker of the caller's runtime, where
    /// the NATS connection is read); gathering stays with the caller.
    ///
    /// `when_behind`: what the loop does once the thread is a run behind and
    /// four times `queries.max_rows` have gathered (see [`BackgroundStage::offer`]).
    pub fn spawn(self, when_behind: WhenBehind) -> BackgroundStage {
        let FeatureStage {
            gather,
            mut queries,
            ..
        } = self;
        // One run queued while one runs: a loop that closes windows faster
        // than the queries answer waits, rather than piling up tables.
        let (jobs, mut inbox) = tokio::sync::mpsc::channel::<ClosedWindows>(1);
        // Unbounded, but never holds more than the runs in flight (at most two).
        let (done, results) = tokio::sync::mpsc::unbounded_channel();
        let task = std::thread::Builder::new()
            .name(QUERY_THREAD.into())
            .spawn(move || {
                yield_to_ingest();
                let rt = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        warn!(error = %e, "cannot start the query stage; query features are off");
                        return;
                    }
                };
                let mut release = crate::memory::Releaser::default();
                rt.block_on(async move {
                    while let Some(closed) = inbox.recv().await {
                        let started = Instant::now();
                        queries.reload().await;
                        let out = queries.run(&closed).await;
                        drop(closed);
                        // The run's tables and the windows it read are freed
                        // now: their pages go back (now and then) rather than
                        // stay resident beside what other threads hold.
                        release.after_work();
                        if done.send((out, started.elapsed())).is_err() {
                            break;
                        }
                    }
                });
            });
        if let Err(e) = &task {
            warn!(error = %e, "cannot start the query stage's thread; query features are off");
        }
        BackgroundStage::new(gather, jobs, results, task, when_behind)
    }
}

/// What the ingest loop does when the query thread falls behind: a run in
/// hand, the next queued, and four times `queries.max_rows` gathered since.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WhenBehind {
    /// Wait for the thread. For JetStream, where the backlog waits on the
    /// server: nothing is lost, consumption only slows.
    Wait,
    /// Drop the oldest gathered windows from the queries (counted, and
    /// warned of) and go on. For core NATS: there a loop that waits falls
    /// behind its input, and the inbox then drops messages — the per-reading
    /// detectors lose them, and the gaps in sequence numbers read as
    /// attacks. The query thread runs at nice 10, so on a saturated machine
    /// it gets little CPU: waiting on it halved what the loop got through.
    Shed,
}

impl WhenBehind {
    /// The choice for a source: JetStream keeps what arrives while the loop
    /// is behind, core NATS loses it.
    pub fn for_source(jetstream: bool) -> Self {
        if jetstream {
            WhenBehind::Wait
        } else {
            WhenBehind::Shed
        }
    }
}

/// The feature stage on a thread of its own (`run`): the ingest loop hands it
/// the windows a batch closed and goes on decoding and scoring while the
/// queries run on another core; their results come back in the order the
/// windows were handed over. Only when the stage is a run behind and much has
/// gathered does the loop wait for it or shed windows ([`WhenBehind`]).
pub struct BackgroundStage {
    gather: Gather,
    jobs: tokio::sync::mpsc::Sender<ClosedWindows>,
    results: tokio::sync::mpsc::UnboundedReceiver<(RunOutput, Duration)>,
    in_flight: usize,
    deferred: u64,
    when_behind: WhenBehind,
    /// Machine-windows dropped from the queries while the thread was behind.
    shed: u64,
    /// When the shedding was last warned of.
    warned: Option<Instant>,
    /// Ends on its own once `jobs` is dropped (after the run in hand).
    _task: std::io::Result<std::thread::JoinHandle<()>>,
    /// Runs answered so far, and their total time.
    pub runs: u64,
    pub busy: Duration,
}

impl BackgroundStage {
    fn new(
        gather: Gather,
        jobs: tokio::sync::mpsc::Sender<ClosedWindows>,
        results: tokio::sync::mpsc::UnboundedReceiver<(RunOutput, Duration)>,
        task: std::io::Result<std::thread::JoinHandle<()>>,
        when_behind: WhenBehind,
    ) -> Self {
        BackgroundStage {
            gather,
            jobs,
            results,
            in_flight: 0,
            deferred: 0,
            when_behind,
            shed: 0,
            warned: None,
            _task: task,
            runs: 0,
            busy: Duration::ZERO,
        }
    }

    /// Gathers the windows a batch closed and hands them over when a run is
    /// due (or whatever is gathered, when `force`). While the thread is busy
    /// with one run and has the next queued, windows keep gathering into a
    /// bigger run instead of holding up the loop (the fast path's alerts do
    /// not wait for the queries). Past four times `queries.max_rows`
    /// gathered, so that memory stays bounded, the loop waits or the oldest
    /// windows are shed down to twice that ([`WhenBehind`]).
    pub async fn offer(&mut self, closed: Option<ClosedWindows>, force: bool) {
        self.gather.offer(closed);
        if !(force || self.gather.due()) {
            return;
        }
        let busy = self.jobs.capacity() == 0;
        if busy && !force {
            let bound = 4 * self.gather.max_rows;
            if self.gather.rows < bound || self.when_behind == WhenBehind::Shed {
                if self.gather.rows >= bound {
                    self.shed_down_to(bound / 2);
                }
                self.deferred += 1;
                return;
            }
        }
        if let Some(c) = self.gather.take()
            && self.jobs.send(c).await.is_ok()
        {
            self.in_flight += 1;
        }
    }

    /// Sheds the oldest gathered windows down to `keep` rows, counted and warned of.
    fn shed_down_to(&mut self, keep: usize) {
        let shed = self.gather.shed_oldest(keep);
        self.shed += shed as u64;
        if self
            .warned
            .is_none_or(|at| at.elapsed() >= Duration::from_secs(10))
        {
            self.warned = Some(Instant::now());
            warn!(
                machine_windows = shed,
                shed_total = self.shed,
                "the query stage is behind: the oldest closed windows are not queried, so that \
                 the loop keeps up with its input (per-reading detection goes on); give twinwatch \
                 more CPU, raise queries.every, or consume through JetStream (which waits instead)"
            );
        }
    }

    /// Times a due run was folded into the next because the thread was busy.
    pub fn deferred(&self) -> u64 {
        self.deferred
    }

    /// Machine-windows dropped from the queries because the thread was behind
    /// ([`WhenBehind::Shed`]).
    pub fn shed(&self) -> u64 {
        self.shed
    }

    /// Runs handed over and not yet answered.
    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// A run's output if one is ready, without waiting.
    pub fn ready(&mut self) -> Option<RunOutput> {
        let r = self.results.try_recv().ok()?;
        Some(self.count(r))
    }

    /// Waits for the next run's output; `None` when nothing is in flight (or
    /// the thread died — its panic is reported by the panic hook — and the loop goes
    /// on without query features rather than stopping detection).
    pub async fn next(&mut self) -> Option<RunOutput> {
        if self.in_flight == 0 {
            return None;
        }
        match self.results.recv().await {
            Some(r) => Some(self.count(r)),
            None => {
                warn!("the query stage stopped; query features are off from here");
                self.in_flight = 0;
                None
            }
        }
    }

    fn count(&mut self, (out, took): (RunOutput, Duration)) -> RunOutput {
        self.in_flight = self.in_flight.saturating_sub(1);
        self.runs += 1;
        self.busy += took;
        out
    }
}

/// One set of window tables out of several (their parts, not copied).
fn merge(parts: Vec<ClosedWindows>) -> ClosedWindows {
    let mut parts = parts.into_iter();
    let mut all = parts.next().expect("merge is called with windows gathered");
    for c in parts {
        all.extend(c);
    }
    all
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_distinct_name_of_a_column_is_interned_once() {
        let long = "a-machine-name-longer-than-twelve-bytes";
        let rows = [
            Some("press-1"),
            Some("press-2"),
            None,
            Some("press-1"),
            Some(long),
            Some("press-2"),
            Some(long),
            Some(""),
            Some("press-123456"),
            Some("press-123456"),
        ];
        let views: ArrayRef = Arc::new(arrow::array::StringViewArray::from(rows.to_vec()));
        let text: ArrayRef = Arc::new(StringArray::from(rows.to_vec()));
        for column in [views, text] {
            let batch = RecordBatch::try_from_iter([("machine", column)]).unwrap();
            let mut col = NameColumn::of(&batch, "machine").unwrap().unwrap();
            let mut interner = crate::intern::Interner::new(usize::MAX);
            let mut calls = 0;
            for (i, row) in rows.iter().enumerate() {
                assert_eq!(col.is_null(i), row.is_none());
                let Some(text) = row else { continue };
                assert_eq!(col.value(i), *text);
                let id = col.id(i, |s| {
                    calls += 1;
                    interner.intern(s).unwrap()
                });
                assert_eq!(&**interner.name(id), *text, "row {i}");
            }
            // Each distinct text once, of nine rows: the short ones of views
            // (12 bytes or less, the empty one too) by their views, the rest
            // by text.
            assert_eq!(calls, 5);
            assert_eq!(interner.len(), 5);
        }
    }

    /// Closed windows of one machine-window: three messages of one reading (six rows).
    fn one_window(k: i64) -> ClosedWindows {
        let cfg = crate::config::Config::default();
        let mut p = crate::pipeline::Pipeline::new(&cfg);
        let base = 1_764_000_000_000 + k * 100_000;
        let batch: Vec<crate::source::Envelope> = (0..3)
            .map(|i| {
                crate::source::Envelope::new(
                    "twin.telemetry.s.m",
                    Some(base + i),
                    format!(r#"{{"ts": {}, "readings": {{"x": 1}}}}"#, base + i),
                )
            })
            .collect();
        p.process(&batch, 0);
        p.finish().closed.expect("the window closes at the end")
    }

    /// A stage whose thread takes no run: once one is handed over, it is
    /// busy for good. Every set offered is due (`every` 0). The receiver of
    /// its runs is returned to be held (dropped, every send would fail at once).
    fn stalled(
        when_behind: WhenBehind,
        max_rows: usize,
    ) -> (BackgroundStage, tokio::sync::mpsc::Receiver<ClosedWindows>) {
        let cfg = crate::config::QueriesConfig {
            every: 0,
            max_rows,
            ..Default::default()
        };
        let (jobs, inbox) = tokio::sync::mpsc::channel(1);
        let (_, results) = tokio::sync::mpsc::unbounded_channel();
        let task = Err(std::io::Error::other("no thread in this test"));
        let stage = BackgroundStage::new(Gather::new(&cfg), jobs, results, task, when_behind);
        (stage, inbox)
    }

    /// Behind, with four times `max_rows` gathered: shedding drops the
    /// oldest windows down to twice that and never holds up the loop;
    /// waiting holds it up and drops nothing.
    #[test]
    fn a_stage_behind_sheds_the_oldest_windows_or_holds_up_the_loop() {
        use futures_util::FutureExt;
        let rows = Gather::rows_of(&one_window(0));
        assert_eq!(rows, 6, "three messages and their three readings");
        // Whether offering window `k` returned at once (did not hold up the loop).
        let at_once = |stage: &mut BackgroundStage, k: i64| {
            stage
                .offer(Some(one_window(k)), false)
                .now_or_never()
                .is_some()
        };

        let (mut shedding, _runs) = stalled(WhenBehind::Shed, rows);
        for k in 0..12 {
            assert!(at_once(&mut shedding, k), "offer {k} held up the loop");
            assert!(
                shedding.gather.rows < 4 * rows,
                "{} rows gathered",
                shedding.gather.rows
            );
        }
        assert_eq!(shedding.in_flight(), 1, "the first set went to the thread");
        // 11 sets gathered behind it, shed two at a time each time four had gathered.
        assert_eq!(shedding.shed(), 8);
        assert_eq!(shedding.gather.pending.len(), 3);
        let newest = one_window(11).span;
        assert_eq!(
            shedding.gather.pending.last().map(|c| c.span),
            Some(newest),
            "the newest stay"
        );

        let (mut waiting, _runs) = stalled(WhenBehind::Wait, rows);
        for k in 0..4 {
            assert!(at_once(&mut waiting, k));
        }
        assert!(
            !at_once(&mut waiting, 4),
            "four times max_rows gathered behind a busy thread: the loop waits"
        );
        assert_eq!(waiting.shed(), 0);
    }

    #[test]
    fn headers() {
        assert_eq!(
            parse_header("a.sql", "-- twinwatch: features\nSELECT 1"),
            Ok(QueryKind::Features)
        );
        assert_eq!(
            parse_header("a.sql", "-- twinwatch: rule severity=high\n"),
            Ok(QueryKind::Rule {
                severity: Severity::High
            })
        );
        let e = parse_header("a.sql", "SELECT 1").unwrap_err();
        assert_eq!((e.line, e.column), (1, 1));
        assert!(parse_header("a.sql", "-- twinwatch: rule severity=urgent").is_err());
        assert!(parse_header("a.sql", "-- twinwatch: dashboards").is_err());
    }

    #[test]
    fn positions_in_parser_messages() {
        assert_eq!(
            position_in_message("Expected: an expression, found: FROM at Line: 3, Column: 8"),
            Some((3, 8))
        );
        assert_eq!(position_in_message("no position"), None);
    }
}
