//! From TOML text to a [`ClusterConfig`], keeping source positions for every error.
//!
//! The document is parsed once into toml's spanned tree. The top-level tables deserialize through
//! serde directly; each `[[actor]]` table is split into its common keys (`name`, `node`, `kind`,
//! `restart`) and the rest, which deserializes into the settings struct its `kind` names. Errors
//! from serde keep the span of the offending value; errors found later by validation are located
//! by walking the same tree with a key path.

use std::ops::Range;
use std::path::Path;

use serde::Deserialize;
use toml::Spanned;
use toml::de::{DeTable, DeValue, ValueDeserializer};

use crate::error::{ConfigError, ConfigErrors};
use crate::kinds::{ActorKind, deserialize_settings};
use crate::model::{ActorConfig, ClusterConfig, ClusterSection, NodeConfig, SupervisionSettings};
use crate::validate::{self, FileChecks};

/// One step of a path into the document: a key or an array index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Seg {
    Key(&'static str),
    Index(usize),
}

impl From<&'static str> for Seg {
    fn from(k: &'static str) -> Self {
        Seg::Key(k)
    }
}

impl From<usize> for Seg {
    fn from(i: usize) -> Self {
        Seg::Index(i)
    }
}

/// A path into the document, e.g. `actor[2].count`.
pub(crate) type KeyPath = Vec<Seg>;

/// Builds a [`KeyPath`] from keys and indices.
macro_rules! key_path {
    ($($seg:expr),* $(,)?) => { vec![$($crate::parse::Seg::from($seg)),*] };
}
pub(crate) use key_path;

/// A problem found after parsing, located by key path.
#[derive(Debug)]
pub(crate) struct Problem {
    pub path: KeyPath,
    pub message: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TopLevel {
    cluster: ClusterSection,
    #[serde(default)]
    supervision: SupervisionSettings,
    #[serde(default)]
    node: Vec<NodeConfig>,
}

impl ClusterConfig {
    /// Reads, parses and validates the config file at `path`; relative paths in it resolve
    /// against its directory.
    pub fn load(path: &Path, checks: FileChecks) -> Result<ClusterConfig, ConfigErrors> {
        let name = path.display().to_string();
        let src = std::fs::read_to_string(path).map_err(|e| {
            ConfigErrors(vec![ConfigError::whole_file(
                &name,
                format!("cannot read the config: {e}"),
            )])
        })?;
        let base_dir = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
            _ => Path::new(".").to_owned(),
        };
        parse_config(&src, &name, &base_dir, checks)
    }

    /// Parses and validates config text, without checking that the files it names exist.
    pub fn from_toml_str(src: &str, name: &str) -> Result<ClusterConfig, ConfigErrors> {
        parse_config(src, name, Path::new("."), FileChecks::Skip)
    }

    /// Parses and validates config text whose relative paths resolve against `base_dir`.
    pub fn from_toml_str_in(
        src: &str,
        name: &str,
        base_dir: &Path,
        checks: FileChecks,
    ) -> Result<ClusterConfig, ConfigErrors> {
        parse_config(src, name, base_dir, checks)
    }
}

fn parse_config(
    src: &str,
    name: &str,
    base_dir: &Path,
    checks: FileChecks,
) -> Result<ClusterConfig, ConfigErrors> {
    let root = DeTable::parse(src).map_err(|e| {
        ConfigErrors(vec![ConfigError::at(
            name,
            src,
            e.span(),
            format!("TOML syntax: {}", e.message().trim()),
        )])
    })?;
    let located = Located { root: &root };
    let mut errors = Vec::new();
    let serde_error = |e: toml::de::Error, fallback: Range<usize>| {
        ConfigError::at(name, src, e.span().or(Some(fallback)), plain(e.message()))
    };

    let root_span = root.span();
    let mut top = root.get_ref().clone();
    let actor_tables = top.remove("actor");

    let top_level = match TopLevel::deserialize(ValueDeserializer::from(Spanned::new(
        root_span.clone(),
        DeValue::Table(top),
    ))) {
        Ok(t) => Some(t),
        Err(e) => {
            errors.push(serde_error(e, root_span.clone()));
            None
        }
    };

    let mut actors = Vec::new();
    match actor_tables.map(Spanned::into_inner) {
        None => {}
        Some(DeValue::Array(items)) => {
            for item in items {
                match parse_actor(item) {
                    Ok(actor) => actors.push(actor),
                    Err(ActorParseError::Serde(e, span)) => errors.push(serde_error(e, span)),
                    Err(ActorParseError::Plain(span, message)) => {
                        errors.push(ConfigError::at(name, src, Some(span), message));
                    }
                }
            }
        }
        Some(_) => errors.push(ConfigError::at(
            name,
            src,
            located.span(&[Seg::Key("actor")]),
            "`actor` must be an array of tables, written [[actor]]".to_owned(),
        )),
    }

    let Some(top_level) = top_level else {
        return Err(ConfigErrors(errors));
    };
    if !errors.is_empty() {
        return Err(ConfigErrors(errors));
    }

    let config = ClusterConfig {
        cluster: top_level.cluster,
        supervision: top_level.supervision,
        nodes: top_level.node,
        actors,
        base_dir: base_dir.to_owned(),
        source_name: name.to_owned(),
    };
    let problems = validate::validate(&config, checks);
    if problems.is_empty() {
        return Ok(config);
    }
    let mut errors: Vec<ConfigError> = problems
        .into_iter()
        .map(|p| ConfigError::at(name, src, located.span(&p.path), p.message))
        .collect();
    errors.sort_by_key(|e| (e.line, e.column));
    Err(ConfigErrors(errors))
}

/// serde's messages end without a period and sometimes span lines; keep them to one line.
fn plain(message: &str) -> String {
    message.trim().replace('\n', " ")
}

enum ActorParseError {
    Serde(toml::de::Error, Range<usize>),
    Plain(Range<usize>, String),
}

fn parse_actor(item: Spanned<DeValue<'_>>) -> Result<ActorConfig, ActorParseError> {
    let span = item.span();
    let DeValue::Table(mut table) = item.into_inner() else {
        return Err(ActorParseError::Plain(
            span,
            "each [[actor]] entry must be a table".to_owned(),
        ));
    };
    let take_string = |table: &mut DeTable<'_>, key: &str| -> Result<String, ActorParseError> {
        match table.remove(key) {
            None => Err(ActorParseError::Plain(
                span.clone(),
                format!("this actor has no `{key}`"),
            )),
            Some(v) => {
                let vspan = v.span();
                match v.into_inner() {
                    DeValue::String(s) => Ok(s.into_owned()),
                    _ => Err(ActorParseError::Plain(
                        vspan,
                        format!("`{key}` must be a string"),
                    )),
                }
            }
        }
    };
    let name = take_string(&mut table, "name")?;
    let node = take_string(&mut table, "node")?;
    let kind_span = table.get("kind").map(Spanned::span);
    let kind_name = take_string(&mut table, "kind")?;
    let kind = ActorKind::from_name(&kind_name).ok_or_else(|| {
        let known: Vec<&str> = ActorKind::ALL.iter().map(|k| k.as_str()).collect();
        ActorParseError::Plain(
            kind_span.clone().unwrap_or(span.clone()),
            format!(
                "unknown kind '{kind_name}'; the kinds are {}",
                known.join(", ")
            ),
        )
    })?;
    let restart = match table.remove("restart") {
        None => Default::default(),
        Some(v) => {
            let vspan = v.span();
            Deserialize::deserialize(ValueDeserializer::from(v))
                .map_err(|e| ActorParseError::Serde(e, vspan))?
        }
    };
    let settings = deserialize_settings(
        kind,
        ValueDeserializer::from(Spanned::new(span.clone(), DeValue::Table(table))),
    )
    .map_err(|e| ActorParseError::Serde(e, span))?;
    Ok(ActorConfig {
        name,
        node,
        restart,
        settings,
    })
}

/// Finds the source span of a key path in the parsed document.
struct Located<'a, 'i> {
    root: &'a Spanned<DeTable<'i>>,
}

impl Located<'_, '_> {
    /// The span of the deepest value the path reaches (the whole document if none).
    fn span(&self, path: &[Seg]) -> Option<Range<usize>> {
        let mut best = None;
        let mut table: Option<&DeTable<'_>> = Some(self.root.get_ref());
        let mut array: Option<&toml::de::DeArray<'_>> = None;
        for seg in path {
            let next: Option<&Spanned<DeValue<'_>>> = match (seg, table, array) {
                (Seg::Key(k), Some(t), _) => t.get(*k),
                (Seg::Index(i), _, Some(a)) => a.get(*i),
                _ => None,
            };
            let Some(value) = next else { break };
            best = Some(value.span());
            table = None;
            array = None;
            match value.get_ref() {
                DeValue::Table(t) => table = Some(t),
                DeValue::Array(a) => array = Some(a),
                _ => {}
            }
        }
        best.or_else(|| Some(self.root.span()))
    }
}
