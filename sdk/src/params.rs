//! Typed plugin parameters: each plugin declares a schema next to its code (as mergekit's
//! merge methods do); hosts check a config against it before any compute, fill in the
//! defaults, and `fusellm plugins list` documents it.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::suggest::did_you_mean;

/// A parameter value as written in a config.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum ParamValue {
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
}

/// The type of a parameter, with its bounds or choices.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum ParamKind {
    Bool,
    Int {
        min: Option<i64>,
        max: Option<i64>,
    },
    Float {
        min: Option<f64>,
        max: Option<f64>,
    },
    /// One of a fixed set of strings.
    Choice {
        options: Vec<String>,
    },
    Str,
}

/// One declared parameter.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ParamSpec {
    pub name: String,
    #[serde(flatten)]
    pub kind: ParamKind,
    pub default: ParamValue,
    pub doc: String,
}

/// Resolved parameters: every declared name present, each of its declared type.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Params(pub BTreeMap<String, ParamValue>);

impl ParamValue {
    /// The type's name as a user reads it in an error.
    pub fn type_name(&self) -> &'static str {
        match self {
            ParamValue::Bool(_) => "boolean",
            ParamValue::Int(_) => "integer",
            ParamValue::Float(_) => "float",
            ParamValue::Str(_) => "string",
        }
    }
}

impl std::fmt::Display for ParamValue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ParamValue::Bool(b) => write!(f, "{b}"),
            ParamValue::Int(i) => write!(f, "{i}"),
            ParamValue::Float(x) => write!(f, "{x:?}"),
            ParamValue::Str(s) => write!(f, "{s:?}"),
        }
    }
}

impl ParamSpec {
    pub fn bool(name: &str, default: bool, doc: &str) -> Self {
        Self::new(name, ParamKind::Bool, ParamValue::Bool(default), doc)
    }

    pub fn int(name: &str, default: i64, doc: &str) -> Self {
        Self::new(name, ParamKind::Int { min: None, max: None }, ParamValue::Int(default), doc)
    }

    pub fn float(name: &str, default: f64, doc: &str) -> Self {
        Self::new(name, ParamKind::Float { min: None, max: None }, ParamValue::Float(default), doc)
    }

    pub fn choice(name: &str, options: &[&str], default: &str, doc: &str) -> Self {
        let options = options.iter().map(|s| s.to_string()).collect();
        Self::new(name, ParamKind::Choice { options }, ParamValue::Str(default.into()), doc)
    }

    pub fn string(name: &str, default: &str, doc: &str) -> Self {
        Self::new(name, ParamKind::Str, ParamValue::Str(default.into()), doc)
    }

    /// Bounds for an int or float parameter (inclusive).
    pub fn range(mut self, lo: Option<f64>, hi: Option<f64>) -> Self {
        match &mut self.kind {
            ParamKind::Int { min, max } => {
                *min = lo.map(|v| v as i64);
                *max = hi.map(|v| v as i64);
            }
            ParamKind::Float { min, max } => (*min, *max) = (lo, hi),
            _ => panic!("range() on the non-numeric parameter `{}`", self.name),
        }
        self
    }

    fn new(name: &str, kind: ParamKind, default: ParamValue, doc: &str) -> Self {
        Self { name: name.into(), kind, default, doc: doc.into() }
    }

    /// A one-line description of the type, for listings and errors.
    pub fn type_label(&self) -> String {
        match &self.kind {
            ParamKind::Bool => "bool".into(),
            ParamKind::Int { min, max } => numeric_label("int", *min, *max),
            ParamKind::Float { min, max } => numeric_label("float", *min, *max),
            ParamKind::Choice { options } => options.join("|"),
            ParamKind::Str => "string".into(),
        }
    }

    /// Checks a value against this parameter's type, widening an integer to a float.
    pub fn check(&self, value: &ParamValue) -> Result<ParamValue, String> {
        let wrong =
            || format!("parameter `{}` expects {}, found {} {value}", self.name, self.type_label(), value.type_name());
        let out_of_range = |v: f64, min: Option<f64>, max: Option<f64>| {
            let below = min.is_some_and(|m| v < m);
            let above = max.is_some_and(|m| v > m);
            (below || above).then(|| format!("parameter `{}` = {value} is outside {}", self.name, self.type_label()))
        };
        match (&self.kind, value) {
            (ParamKind::Bool, ParamValue::Bool(_)) | (ParamKind::Str, ParamValue::Str(_)) => Ok(value.clone()),
            (ParamKind::Int { min, max }, ParamValue::Int(i)) => {
                match out_of_range(*i as f64, min.map(|m| m as f64), max.map(|m| m as f64)) {
                    Some(e) => Err(e),
                    None => Ok(value.clone()),
                }
            }
            (ParamKind::Float { min, max }, ParamValue::Float(_) | ParamValue::Int(_)) => {
                let x = match value {
                    ParamValue::Int(i) => *i as f64,
                    ParamValue::Float(x) => *x,
                    _ => unreachable!(),
                };
                match out_of_range(x, *min, *max) {
                    Some(e) => Err(e),
                    None if x.is_finite() => Ok(ParamValue::Float(x)),
                    None => Err(wrong()),
                }
            }
            (ParamKind::Choice { options }, ParamValue::Str(s)) => {
                if options.iter().any(|o| o == s) {
                    Ok(value.clone())
                } else {
                    Err(format!(
                        "parameter `{}` must be one of {}, found {value}{}",
                        self.name,
                        self.type_label(),
                        did_you_mean(s, options.iter().map(String::as_str))
                    ))
                }
            }
            _ => Err(wrong()),
        }
    }
}

fn numeric_label<T: std::fmt::Display>(name: &str, min: Option<T>, max: Option<T>) -> String {
    match (min, max) {
        (None, None) => name.into(),
        (Some(lo), None) => format!("{name} >= {lo}"),
        (None, Some(hi)) => format!("{name} <= {hi}"),
        (Some(lo), Some(hi)) => format!("{name} in [{lo}, {hi}]"),
    }
}

/// Why a set of parameters does not fit a schema; `param` names the offending key so that
/// a config loader can point at its line.
#[derive(Clone, Debug, PartialEq)]
pub struct ParamError {
    pub param: String,
    pub message: String,
}

impl std::fmt::Display for ParamError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for ParamError {}

impl Params {
    /// Checks `given` against `schema` and fills in the defaults: unknown names (with the
    /// nearest declared one suggested) and wrong types are errors.
    pub fn resolve(schema: &[ParamSpec], given: &BTreeMap<String, ParamValue>) -> Result<Params, ParamError> {
        if let Some(name) = given.keys().find(|k| !schema.iter().any(|s| &s.name == *k)) {
            let declared: Vec<&str> = schema.iter().map(|s| s.name.as_str()).collect();
            let hint = match did_you_mean(name, declared.iter().copied()) {
                h if !h.is_empty() => h,
                _ if declared.is_empty() => "; this plugin takes no parameters".into(),
                _ => format!("; it takes {}", declared.join(", ")),
            };
            return Err(ParamError { param: name.clone(), message: format!("unknown parameter `{name}`{hint}") });
        }
        let mut out = BTreeMap::new();
        for spec in schema {
            let value = match given.get(&spec.name) {
                Some(v) => spec.check(v).map_err(|message| ParamError { param: spec.name.clone(), message })?,
                None => spec.default.clone(),
            };
            out.insert(spec.name.clone(), value);
        }
        Ok(Params(out))
    }

    /// The value of parameter `name`, if resolved.
    pub fn get(&self, name: &str) -> Option<&ParamValue> {
        self.0.get(name)
    }

    /// Parameter `name` as a `T`. Hosts resolve against the plugin's own schema before
    /// calling it, so a declared name is there with its declared type; anything else is an
    /// error, not a panic.
    pub fn read<T: ParamType>(&self, name: &str) -> Result<T, String> {
        match self.get(name) {
            Some(value) => {
                T::read(value).ok_or_else(|| format!("parameter `{name}` is {}, not {}", value.type_name(), T::NAME))
            }
            None => Err(format!("parameter `{name}` was not resolved; is it declared in the plugin's schema?")),
        }
    }
}

/// A Rust type a parameter can have.
pub trait ParamType: Sized {
    /// The type in words, for errors.
    const NAME: &'static str;
    fn spec(name: &str, default: Self, doc: &str) -> ParamSpec;
    fn read(value: &ParamValue) -> Option<Self>;
}

impl ParamType for bool {
    const NAME: &'static str = "a boolean";
    fn spec(name: &str, default: Self, doc: &str) -> ParamSpec {
        ParamSpec::bool(name, default, doc)
    }
    fn read(value: &ParamValue) -> Option<Self> {
        match value {
            ParamValue::Bool(b) => Some(*b),
            _ => None,
        }
    }
}

impl ParamType for i64 {
    const NAME: &'static str = "an integer";
    fn spec(name: &str, default: Self, doc: &str) -> ParamSpec {
        ParamSpec::int(name, default, doc)
    }
    fn read(value: &ParamValue) -> Option<Self> {
        match value {
            ParamValue::Int(i) => Some(*i),
            _ => None,
        }
    }
}

impl ParamType for f64 {
    const NAME: &'static str = "a float";
    fn spec(name: &str, default: Self, doc: &str) -> ParamSpec {
        ParamSpec::float(name, default, doc)
    }
    fn read(value: &ParamValue) -> Option<Self> {
        match value {
            ParamValue::Float(x) => Some(*x),
            ParamValue::Int(i) => Some(*i as f64),
            _ => None,
        }
    }
}

impl ParamType for String {
    const NAME: &'static str = "a string";
    fn spec(name: &str, default: Self, doc: &str) -> ParamSpec {
        ParamSpec::string(name, &default, doc)
    }
    fn read(value: &ParamValue) -> Option<Self> {
        match value {
            ParamValue::Str(s) => Some(s.clone()),
            _ => None,
        }
    }
}

/// A plugin's parameters as one typed struct, declared once with [`params!`](crate::params!):
/// the schema hosts check configs against and the struct the plugin reads (its inherent
/// `read`) come from the same declaration.
pub trait Declared: Sized {
    fn schema() -> Vec<ParamSpec>;
}

/// One field of a [`params!`](crate::params!) struct: its default and its bounds.
pub struct Field<T> {
    default: T,
    range: (Option<f64>, Option<f64>),
}

impl<T: ParamType> Field<T> {
    pub fn new(default: impl Into<T>) -> Self {
        Self { default: default.into(), range: (None, None) }
    }

    /// The smallest value allowed (inclusive), for a number.
    pub fn min(mut self, lo: f64) -> Self {
        self.range.0 = Some(lo);
        self
    }

    /// The largest value allowed (inclusive), for a number.
    pub fn max(mut self, hi: f64) -> Self {
        self.range.1 = Some(hi);
        self
    }

    /// The declared parameter `name`, documented by the field's doc comment lines.
    pub fn spec(self, name: &str, doc: &[&str]) -> ParamSpec {
        let doc: Vec<&str> = doc.iter().map(|line| line.trim()).collect();
        let mut spec = T::spec(name, self.default, &doc.join(" "));
        if self.range != (None, None) {
            spec = spec.range(self.range.0, self.range.1);
        }
        spec
    }
}

/// Declares a plugin's parameters once, as a struct: each field's doc comment, type,
/// default and bounds (`min(x)`, `max(x)`); a choice is a field of an enum declared with
/// [`choices!`](crate::choices!). The struct
/// implements [`Declared`], its schema for [`PluginInfo::params`](crate::PluginInfo::params),
/// and has `read(&Params) -> Result<Self, String>` for the resolved parameters.
///
/// ```
/// fusellm_sdk::params! {
///     /// What `dtw` takes.
///     pub struct DtwParams {
///         /// 0: the full matrix; otherwise only cells this near the diagonal
///         band: i64 = 0, min(0.0);
///         /// how a tie is broken
///         ties: Ties = Ties::Diagonal;
///     }
/// }
/// fusellm_sdk::choices! {
///     /// How `dtw` breaks a tie.
///     pub enum Ties { Diagonal = "diagonal", Up = "up" }
/// }
/// use fusellm_sdk::params::Declared;
/// assert_eq!(DtwParams::schema()[0].name, "band");
/// ```
#[macro_export]
macro_rules! params {
    (
        $(#[$meta:meta])*
        $vis:vis struct $name:ident {
            $(
                $(#[doc = $doc:literal])*
                $field:ident : $ty:ty = $default:expr $(, $opt:ident($($arg:expr),*))* ;
            )*
        }
    ) => {
        $(#[$meta])*
        #[derive(Clone, Debug, PartialEq)]
        $vis struct $name {
            $( $(#[doc = $doc])* pub $field: $ty, )*
        }

        impl $crate::params::Declared for $name {
            fn schema() -> Vec<$crate::ParamSpec> {
                vec![$(
                    $crate::params::Field::<$ty>::new($default)$(.$opt($($arg),*))*
                        .spec(stringify!($field), &[$($doc),*])
                ),*]
            }
        }

        impl $name {
            /// The resolved parameters as this struct.
            $vis fn read(params: &$crate::Params) -> Result<Self, String> {
                Ok(Self { $( $field: params.read::<$ty>(stringify!($field))?, )* })
            }
        }
    };
}

/// Declares a choice parameter's options as a Rust enum, each variant with the string a
/// config writes: a [`params!`](crate::params!) field of it is a choice, listed with its
/// options and read as the variant (no string compared in the plugin).
///
/// ```
/// fusellm_sdk::choices! {
///     /// How AvgCE weighs the candidates.
///     pub enum Weights { Paper = "paper", Softmax = "softmax" }
/// }
/// assert_eq!(Weights::OPTIONS, ["paper", "softmax"]);
/// ```
#[macro_export]
macro_rules! choices {
    ($(#[$meta:meta])* $vis:vis enum $name:ident { $($variant:ident = $text:literal),+ $(,)? }) => {
        $(#[$meta])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        $vis enum $name {
            $($variant),+
        }

        impl $name {
            /// The strings a config may write, in order.
            pub const OPTIONS: &'static [&'static str] = &[$($text),+];

            pub fn as_str(self) -> &'static str {
                match self {
                    $(Self::$variant => $text),+
                }
            }
        }

        impl $crate::params::ParamType for $name {
            const NAME: &'static str = "one of its choices";
            fn spec(name: &str, default: Self, doc: &str) -> $crate::ParamSpec {
                $crate::ParamSpec::choice(name, Self::OPTIONS, default.as_str(), doc)
            }
            fn read(value: &$crate::ParamValue) -> Option<Self> {
                match value {
                    $crate::ParamValue::Str(s) => match s.as_str() {
                        $($text => Some(Self::$variant),)+
                        _ => None,
                    },
                    _ => None,
                }
            }
        }
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schema() -> Vec<ParamSpec> {
        vec![
            ParamSpec::choice("weights", &["paper", "softmax"], "paper", ""),
            ParamSpec::float("tau", 1.0, "").range(Some(0.0), None),
            ParamSpec::bool("include_target", true, ""),
        ]
    }

    fn given(pairs: &[(&str, ParamValue)]) -> BTreeMap<String, ParamValue> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.clone())).collect()
    }

    #[test]
    fn fills_defaults_and_widens_ints() {
        let p = Params::resolve(&schema(), &given(&[("tau", ParamValue::Int(2))])).unwrap();
        assert_eq!(p.read::<f64>("tau"), Ok(2.0));
        assert_eq!(p.read::<String>("weights").as_deref(), Ok("paper"));
        assert_eq!(p.read::<bool>("include_target"), Ok(true));
        assert!(p.read::<i64>("tau").unwrap_err().contains("parameter `tau` is float, not an integer"));
        assert!(p.read::<bool>("nope").is_err(), "reading an undeclared name is an error, not a panic");
    }

    crate::params! {
        /// A declaration as plugins write one.
        struct Weighting {
            /// candidates' weights
            weights: Weights = Weights::Paper;
            /// temperature
            /// of the softmax
            tau: f64 = 1.0, min(0.0);
            include_target: bool = true;
        }
    }

    crate::choices! {
        /// A choice as plugins declare one.
        enum Weights { Paper = "paper", Softmax = "softmax" }
    }

    /// The struct's declaration gives the same schema as the one written out, and reads
    /// resolved parameters into its fields.
    #[test]
    fn a_declared_struct_is_its_schema_and_its_reader() {
        let declared = Weighting::schema();
        let names: Vec<&str> = declared.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["weights", "tau", "include_target"]);
        assert_eq!(
            declared.iter().map(|s| &s.kind).collect::<Vec<_>>(),
            schema().iter().map(|s| &s.kind).collect::<Vec<_>>()
        );
        assert_eq!(declared[1].doc, "temperature of the softmax");
        let p = Params::resolve(&declared, &given(&[("tau", ParamValue::Int(3))])).unwrap();
        assert_eq!(Weighting::read(&p), Ok(Weighting { weights: Weights::Paper, tau: 3.0, include_target: true }));
    }

    #[test]
    fn rejects_unknown_names_with_a_suggestion() {
        let e = Params::resolve(&schema(), &given(&[("weight", ParamValue::Str("paper".into()))])).unwrap_err();
        assert_eq!(e.param, "weight");
        assert!(e.message.contains("did you mean `weights`"), "{}", e.message);
    }

    #[test]
    fn rejects_wrong_types_and_ranges() {
        let e = Params::resolve(&schema(), &given(&[("tau", ParamValue::Str("big".into()))])).unwrap_err();
        assert!(e.message.contains("expects float >= 0, found string \"big\""), "{}", e.message);
        let e = Params::resolve(&schema(), &given(&[("tau", ParamValue::Float(-1.0))])).unwrap_err();
        assert!(e.message.contains("outside"), "{}", e.message);
        let e = Params::resolve(&schema(), &given(&[("weights", ParamValue::Str("sofmax".into()))])).unwrap_err();
        assert!(e.message.contains("did you mean `softmax`"), "{}", e.message);
    }
}
