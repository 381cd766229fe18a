//! The file as TOML: the section types, read key by key from a
//! `toml::Table` so that every error names its key as a path, and written
//! back with serde ([`MachineSpec::to_toml`]).

use std::path::Path;

use serde::Serialize;
use toml::{Table, Value};

use super::{ConfigError, Cx, G, K, M, MachineSpec, Result, join};

/// A size as written: an integer, or a string with an optional suffix.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(untagged)]
pub(super) enum SizeValue {
    Bytes(i64),
    Text(String),
}

impl SizeValue {
    /// The shortest exact spelling of `bytes`.
    pub(super) fn of(bytes: u64) -> Self {
        match human(bytes) {
            Some(text) => SizeValue::Text(text),
            None => i64::try_from(bytes)
                .map_or_else(|_| SizeValue::Text(bytes.to_string()), SizeValue::Bytes),
        }
    }
}

/// `bytes` with a suffix when a multiple of 1K (and not 0).
fn human(bytes: u64) -> Option<String> {
    [(G, 'G'), (M, 'M'), (K, 'K')]
        .into_iter()
        .find(|&(unit, _)| bytes != 0 && bytes.is_multiple_of(unit))
        .map(|(unit, suffix)| format!("{}{suffix}", bytes / unit))
}

/// `bytes` for messages.
pub(super) fn show(bytes: u64) -> String {
    human(bytes).unwrap_or_else(|| bytes.to_string())
}

/// A switch as written: a bool or `"on"`/`"off"`.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(untagged)]
pub(super) enum Switch {
    Bool(bool),
    Text(String),
}

/// Why a value has the wrong TOML type; `suffix` extends the key
/// (`[1]` for an array element).
struct LeafError {
    suffix: String,
    message: String,
}

/// A TOML value of one of the types a key takes.
trait Leaf: Sized {
    fn from_value(v: &Value) -> Result<Self, LeafError>;
}

fn expected(what: &str, v: &Value) -> LeafError {
    LeafError {
        suffix: String::new(),
        message: format!("expected {what}, found {}", describe(v)),
    }
}

fn describe(v: &Value) -> String {
    match v {
        Value::String(s) => format!("the string {s:?}"),
        Value::Integer(i) => format!("the integer {i}"),
        Value::Float(f) => format!("the float {f}"),
        Value::Boolean(b) => format!("the boolean {b}"),
        Value::Datetime(d) => format!("the date-time {d}"),
        Value::Array(_) => "an array".to_owned(),
        Value::Table(_) => "a table".to_owned(),
    }
}

impl Leaf for String {
    fn from_value(v: &Value) -> Result<Self, LeafError> {
        v.as_str()
            .map(str::to_owned)
            .ok_or_else(|| expected("a string", v))
    }
}

impl Leaf for i64 {
    fn from_value(v: &Value) -> Result<Self, LeafError> {
        v.as_integer().ok_or_else(|| expected("an integer", v))
    }
}

impl Leaf for bool {
    fn from_value(v: &Value) -> Result<Self, LeafError> {
        v.as_bool().ok_or_else(|| expected("true or false", v))
    }
}

impl Leaf for Vec<String> {
    fn from_value(v: &Value) -> Result<Self, LeafError> {
        let items = v
            .as_array()
            .ok_or_else(|| expected("an array of strings", v))?;
        items
            .iter()
            .enumerate()
            .map(|(i, item)| {
                String::from_value(item).map_err(|e| LeafError {
                    suffix: format!("[{i}]"),
                    message: e.message,
                })
            })
            .collect()
    }
}

impl Leaf for SizeValue {
    fn from_value(v: &Value) -> Result<Self, LeafError> {
        match v {
            Value::Integer(i) => Ok(SizeValue::Bytes(*i)),
            Value::String(s) => Ok(SizeValue::Text(s.clone())),
            _ => Err(expected(
                "a number of bytes (an integer, or a string such as \"64K\")",
                v,
            )),
        }
    }
}

impl Leaf for Switch {
    fn from_value(v: &Value) -> Result<Self, LeafError> {
        match v {
            Value::Boolean(b) => Ok(Switch::Bool(*b)),
            Value::String(s) => Ok(Switch::Text(s.clone())),
            _ => Err(expected("true, false, \"on\" or \"off\"", v)),
        }
    }
}

/// A section of the file: every key optional, read key by key so that an
/// error names its key. `KEYS` is the list of allowed keys.
macro_rules! section {
    ($(#[$meta:meta])* struct $name:ident { $($field:ident: $ty:ty,)* }) => {
        $(#[$meta])*
        #[derive(Clone, Debug, Default, PartialEq, Serialize)]
        pub(super) struct $name {
            $(
                #[serde(skip_serializing_if = "Option::is_none")]
                pub(super) $field: Option<$ty>,
            )*
        }

        impl $name {
            pub(super) const KEYS: &'static [&'static str] = &[$(stringify!($field)),*];

            fn from_table(t: &Table, at: &str, cx: &Cx<'_>) -> Result<Self> {
                cx.check_keys(t, at, Self::KEYS, "key")?;
                Ok(Self { $($field: cx.leaf(t, at, stringify!($field))?,)* })
            }
        }
    };
}

section! {
    /// `[machine]`.
    struct MachineToml {
        cpus: i64,
        memory: SizeValue,
        spl: String,
        intr_stack: Switch,
        data_dir: String,
        idle_poll_us: i64,
    }
}

section! {
    /// One `[[disk]]`.
    struct DiskToml {
        name: String,
        file: String,
        size: SizeValue,
        sector_size: i64,
        dvma: String,
        completion: String,
        read_only: bool,
        cpu: i64,
        queue_depth: i64,
        max_transfer: SizeValue,
        workers: i64,
        o_direct: bool,
        write_cache: bool,
        write_cache_size: SizeValue,
        engine: String,
        coalesce_count: i64,
        coalesce_us: i64,
        poll_us: i64,
        slots: i64,
        pool: SizeValue,
    }
}

section! {
    /// One `[[ccd]]`.
    struct CcdToml {
        name: String,
        components: Vec<String>,
        interleave: SizeValue,
        completion: String,
        cbufs: String,
        read_only: bool,
    }
}

section! {
    /// One `[[vnd]]`.
    struct VndToml {
        name: String,
        file: String,
        size: SizeValue,
        completion: String,
        read_only: bool,
    }
}

/// The whole file.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub(super) struct FileToml {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) machine: Option<MachineToml>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub(super) disk: Vec<DiskToml>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub(super) ccd: Vec<CcdToml>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub(super) vnd: Vec<VndToml>,
}

pub(super) const SECTIONS: [&str; 4] = ["machine", "disk", "ccd", "vnd"];

impl Cx<'_> {
    pub(super) fn parse(&self, text: &str) -> Result<FileToml> {
        let top: Table = text.parse().map_err(|e: toml::de::Error| {
            let (line, column) = e.span().map_or((1, 1), |s| line_col(text, s.start));
            ConfigError::Syntax {
                path: self.origin.to_path_buf(),
                line,
                column,
                message: e.message().trim().replace('\n', "; "),
            }
        })?;
        for key in top.keys() {
            if !SECTIONS.contains(&key.as_str()) && MachineToml::KEYS.contains(&key.as_str()) {
                return Err(self.err(
                    key.as_str(),
                    format!(
                        "unknown section; expected one of {} ({key} belongs under [machine])",
                        SECTIONS.join(", ")
                    ),
                ));
            }
        }
        self.check_keys(&top, "", &SECTIONS, "section")?;
        let machine = match top.get("machine") {
            None => None,
            Some(Value::Table(t)) => Some(MachineToml::from_table(t, "machine", self)?),
            Some(v) => {
                return Err(self.err(
                    "machine",
                    format!("expected a table ([machine]), found {}", describe(v)),
                ));
            }
        };
        Ok(FileToml {
            machine,
            disk: self.entries(&top, "disk", DiskToml::from_table)?,
            ccd: self.entries(&top, "ccd", CcdToml::from_table)?,
            vnd: self.entries(&top, "vnd", VndToml::from_table)?,
        })
    }

    /// The `[[section]]` entries.
    fn entries<T>(
        &self,
        top: &Table,
        section: &str,
        read: impl Fn(&Table, &str, &Self) -> Result<T>,
    ) -> Result<Vec<T>> {
        match top.get(section) {
            None => Ok(Vec::new()),
            Some(Value::Array(items)) => items
                .iter()
                .enumerate()
                .map(|(i, item)| {
                    let at = format!("{section}[{i}]");
                    match item {
                        Value::Table(t) => read(t, &at, self),
                        other => Err(self.err(
                            at,
                            format!(
                                "expected a table ([[{section}]]), found {}",
                                describe(other)
                            ),
                        )),
                    }
                })
                .collect(),
            Some(Value::Table(_)) => Err(self.err(
                section,
                format!("expected an array of tables: write [[{section}]], not [{section}]"),
            )),
            Some(v) => Err(self.err(
                section,
                format!(
                    "expected an array of tables ([[{section}]]), found {}",
                    describe(v)
                ),
            )),
        }
    }

    fn check_keys(&self, t: &Table, at: &str, allowed: &[&str], what: &str) -> Result<()> {
        match t.keys().find(|k| !allowed.contains(&k.as_str())) {
            None => Ok(()),
            Some(k) => {
                let mut message = format!("unknown {what}; expected one of {}", allowed.join(", "));
                if let Some(s) = suggest(k, allowed) {
                    message.push_str(&format!(" (did you mean {s}?)"));
                }
                Err(self.err(join(at, k), message))
            }
        }
    }

    fn leaf<T: Leaf>(&self, t: &Table, at: &str, key: &str) -> Result<Option<T>> {
        t.get(key)
            .map(|v| {
                T::from_value(v)
                    .map_err(|e| self.err(format!("{}{}", join(at, key), e.suffix), e.message))
            })
            .transpose()
    }
}

impl MachineSpec {
    /// The spec as a TOML file with every key explicit (`data_dir`
    /// absolute, files relative to it when under it). It parses back to an
    /// equal spec.
    pub fn to_toml(&self) -> String {
        let m = &self.machine;
        let dir = &m.data_dir;
        let file = FileToml {
            machine: Some(MachineToml {
                cpus: Some(self.machine.cpus as i64),
                memory: Some(SizeValue::of(m.memory)),
                spl: Some(m.spl.name().to_owned()),
                intr_stack: Some(Switch::Bool(m.intr_stack)),
                data_dir: Some(dir.to_string_lossy().into_owned()),
                idle_poll_us: Some(i64::from(m.idle_poll_us)),
            }),
            disk: self
                .disks
                .iter()
                .map(|d| DiskToml {
                    name: Some(d.name.clone()),
                    file: Some(relative_to(&d.file, dir)),
                    size: d.size.map(SizeValue::of),
                    sector_size: Some(i64::from(d.sector_size)),
                    dvma: Some(d.dvma.name().to_owned()),
                    completion: Some(d.completion.name().to_owned()),
                    read_only: Some(d.read_only),
                    cpu: Some(d.cpu as i64),
                    queue_depth: Some(i64::from(d.queue_depth)),
                    max_transfer: Some(SizeValue::of(d.max_transfer as u64)),
                    workers: Some(d.workers as i64),
                    o_direct: Some(d.o_direct),
                    write_cache: Some(d.write_cache),
                    write_cache_size: Some(SizeValue::of(d.write_cache_size)),
                    engine: Some(d.engine.name().to_owned()),
                    coalesce_count: Some(i64::from(d.coalesce_count)),
                    coalesce_us: Some(i64::from(d.coalesce_us)),
                    poll_us: Some(i64::from(d.poll_us)),
                    slots: Some(d.slots as i64),
                    pool: Some(SizeValue::of(d.pool)),
                })
                .collect(),
            ccd: self
                .ccds
                .iter()
                .map(|c| CcdToml {
                    name: Some(c.name.clone()),
                    components: Some(c.components.clone()),
                    interleave: Some(SizeValue::of(c.interleave)),
                    completion: Some(c.completion.name().to_owned()),
                    cbufs: Some(c.cbufs.name().to_owned()),
                    read_only: Some(c.read_only),
                })
                .collect(),
            vnd: self
                .vnds
                .iter()
                .map(|v| VndToml {
                    name: Some(v.name.clone()),
                    file: Some(relative_to(&v.file, dir)),
                    size: v.size.map(SizeValue::of),
                    completion: Some(v.completion.name().to_owned()),
                    read_only: Some(v.read_only),
                })
                .collect(),
        };
        let body = match toml::to_string(&file) {
            Ok(s) => s,
            Err(e) => unreachable!("the schema has only TOML types: {e}"),
        };
        format!("# dvma machine description (every key explicit)\n\n{body}")
    }
}

const SIZE_SYNTAX: &str = "expected a number of bytes with an optional K, M or G suffix";

/// A size: an integer, or digits with an optional K/M/G suffix.
pub(super) fn parse_size(v: &SizeValue) -> Result<u64, String> {
    match v {
        SizeValue::Bytes(b) => {
            u64::try_from(*b).map_err(|_| format!("{b}: a size cannot be negative"))
        }
        SizeValue::Text(s) => {
            let (digits, unit) = match s.as_bytes().last() {
                Some(b'K' | b'k') => (&s[..s.len() - 1], K),
                Some(b'M' | b'm') => (&s[..s.len() - 1], M),
                Some(b'G' | b'g') => (&s[..s.len() - 1], G),
                _ => (s.as_str(), 1),
            };
            if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
                return Err(format!("{s:?}: {SIZE_SYNTAX}"));
            }
            digits
                .parse::<u64>()
                .ok()
                .and_then(|n| n.checked_mul(unit))
                .ok_or_else(|| format!("{s:?}: too large"))
        }
    }
}

/// 1-based line and column (in characters) of byte `offset` of `text`.
pub(super) fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = &text.as_bytes()[..offset];
    let line = before.iter().filter(|&&b| b == b'\n').count() + 1;
    let start = before
        .iter()
        .rposition(|&b| b == b'\n')
        .map_or(0, |p| p + 1);
    let column = String::from_utf8_lossy(&before[start..]).chars().count() + 1;
    (line, column)
}

/// `file` relative to `dir` when under it, else as it is.
pub(super) fn relative_to(file: &Path, dir: &Path) -> String {
    file.strip_prefix(dir)
        .ok()
        .filter(|r| !r.as_os_str().is_empty())
        .unwrap_or(file)
        .to_string_lossy()
        .into_owned()
}

/// The allowed value closest to a misspelt `key`, if close enough.
pub(super) fn suggest<'a>(key: &str, allowed: &[&'a str]) -> Option<&'a str> {
    allowed
        .iter()
        .map(|&a| (edit_distance(key, a), a))
        .filter(|&(d, a)| d <= 2.max(a.len() / 4) && d < a.len())
        .min_by_key(|&(d, _)| d)
        .map(|(_, a)| a)
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for (j, &cb) in b.iter().enumerate() {
            let cur = row[j + 1];
            row[j + 1] = (prev + usize::from(ca != cb)).min(row[j] + 1).min(cur + 1);
            prev = cur;
        }
    }
    row[b.len()]
}
