//! `${VAR}`, `${VAR:-default}` and `${VAR-default}` interpolation of a config file's text,
//! before parsing. Comments are left alone; errors point at the variable.

use super::*;

/// Replaces `${VAR}`, `${VAR:-default}` (default when unset or empty) and
/// `${VAR-default}` (default only when unset) with values from `env`; `$${` is a literal `${`.
/// An unset variable without default is an error at its position. Comments
/// are left as written: documenting `${ENV}` in a comment must not require it.
pub(super) fn interpolate(
    text: &str,
    env: impl Fn(&str) -> Option<String>,
) -> Result<String, Diagnostic> {
    let mut out = String::with_capacity(text.len());
    for (i, line) in text.split_inclusive('\n').enumerate() {
        let (code, comment) = line.split_at(comment_start(line));
        out.push_str(&interpolate_text(code, &env, (i as u64 + 1, 1))?);
        out.push_str(comment);
    }
    Ok(out)
}

/// Byte index where a YAML comment starts on `line` (its length if none): a
/// `#` at the start or after whitespace, outside quotes.
pub(super) fn comment_start(line: &str) -> usize {
    let (mut single, mut double, mut prev_space) = (false, false, true);
    for (i, c) in line.char_indices() {
        match c {
            '\'' if !double => single = !single,
            '"' if !single => double = !double,
            '#' if !single && !double && prev_space => return i,
            _ => {}
        }
        prev_space = c.is_whitespace();
    }
    line.len()
}

/// Interpolates one piece of a line; `base` is its (line, column) for errors.
pub(super) fn interpolate_text(
    text: &str,
    env: &impl Fn(&str) -> Option<String>,
    base: (u64, u64),
) -> Result<String, Diagnostic> {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        let tail = &rest[at..];
        if let Some(after) = tail.strip_prefix("$${") {
            out.push_str("${");
            rest = after;
            continue;
        }
        if !tail.starts_with("${") {
            out.push('$');
            rest = &tail[1..];
            continue;
        }
        let offset = text.len() - tail.len();
        let (line, column) = (base.0, base.1 + text[..offset].chars().count() as u64);
        let Some(end) = tail.find('}') else {
            return Err(Diagnostic::new(
                Path::new(""),
                line,
                column,
                "unterminated \"${\": write ${VAR} or ${VAR:-default} (or $${ for a literal)"
                    .to_string(),
            ));
        };
        let expr = &tail[2..end];
        // `${VAR:-d}`: d when VAR is unset or empty, as in the shell;
        // `${VAR-d}`: d only when VAR is unset.
        let (name, default, empty_is_unset) = match expr.split_once(":-") {
            Some((name, default)) => (name, Some(default), true),
            None => match expr.split_once('-') {
                Some((name, default)) => (name, Some(default), false),
                None => (expr, None, false),
            },
        };
        let valid_name = !name.is_empty()
            && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
            && !name.starts_with(|c: char| c.is_ascii_digit());
        if !valid_name {
            return Err(Diagnostic::new(
                Path::new(""),
                line,
                column,
                format!("invalid variable name \"{name}\" in \"${{{expr}}}\""),
            ));
        }
        let value = env(name).filter(|v| !(empty_is_unset && v.is_empty()));
        match (value, default) {
            (Some(value), _) => out.push_str(&value),
            (None, Some(default)) => out.push_str(default),
            (None, None) => {
                return Err(Diagnostic::new(
                    Path::new(""),
                    line,
                    column,
                    format!(
                        "environment variable \"{name}\" is not set (write ${{{name}:-default}} to give a default)"
                    ),
                ));
            }
        }
        rest = &tail[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}
