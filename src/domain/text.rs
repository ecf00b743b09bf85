//! The character rule of free text: reasons, operator names and metadata values.
//!
//! Text is valid UTF-8 (gRPC strings and JSON are) without control characters: no U+0000–U+001F
//! and no U+007F–U+009F, except tab and newline where a field may hold several lines (reasons
//! and metadata values). PostgreSQL refuses NUL in text and SQLite stores it, so without this
//! rule one backend accepted what the other failed on; a control character in an operator name
//! or a CSV cell is a spoofing vector either way. Length limits are each field's own.

use super::error::FieldViolation;

/// Whether free text may hold several lines (tab and newline allowed).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lines {
    /// One line: no control character at all.
    One,
    /// Several lines: tab and newline allowed, no other control character.
    Many,
}

/// Whether `c` is refused in free text of this kind.
#[must_use]
pub fn is_refused(c: char, lines: Lines) -> bool {
    c.is_control() && !(lines == Lines::Many && matches!(c, '\t' | '\n'))
}

/// Checks free text: at most `max_chars` characters, none refused.
///
/// # Errors
/// A [`FieldViolation`] on `field` naming the first refused character by its code point.
pub fn check(
    field: &'static str,
    value: &str,
    max_chars: usize,
    lines: Lines,
) -> Result<(), FieldViolation> {
    if value.chars().count() > max_chars {
        return Err(FieldViolation::new(
            field,
            format!("must be at most {max_chars} characters"),
        ));
    }
    if let Some(c) = value.chars().find(|c| is_refused(*c, lines)) {
        let allowed = match lines {
            Lines::One => "",
            Lines::Many => " other than tab and newline",
        };
        return Err(FieldViolation::new(
            field,
            format!(
                "must not contain control characters{allowed} (found U+{:04X})",
                u32::from(c)
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_are_refused_with_their_code_point() {
        assert!(check("reason", "two\nlines\tok", 20, Lines::Many).is_ok());
        let e = check("reason", "nul\0byte", 20, Lines::Many).unwrap_err();
        assert!(e.to_string().contains("U+0000"), "{e}");
        assert!(check("operator", "a\nb", 20, Lines::One).is_err());
        assert!(check("reason", "cr\r", 20, Lines::Many).is_err());
        assert!(check("reason", "c1\u{85}", 20, Lines::Many).is_err());
        assert!(check("reason", "del\u{7f}", 20, Lines::Many).is_err());
        assert!(check("reason", "émoji 🎬 ok", 20, Lines::One).is_ok());
        assert!(check("reason", "abc", 2, Lines::One).is_err());
    }
}
