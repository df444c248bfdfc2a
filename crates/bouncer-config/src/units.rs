//! Human-friendly durations (`"500ms"`, `"2s"`, `"5m"`) and sizes (`"64KiB"`, `"10MiB"`).

use std::time::Duration;

/// Parses a duration: a whole or decimal number followed by `ms`, `s`, `m` or `h`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .ok_or_else(|| "a duration needs a unit: ms, s, m or h (as in \"2s\")".to_string())?;
    let (number, unit) = text.split_at(split);
    let seconds_per_unit = match unit.trim() {
        "ms" => 0.001,
        "s" => 1.0,
        "m" => 60.0,
        "h" => 3600.0,
        other => return Err(format!("unknown unit \"{other}\": use ms, s, m or h")),
    };
    let number: f64 = number
        .parse()
        .map_err(|_| format!("\"{number}\" is not a number"))?;
    let seconds = number * seconds_per_unit;
    // Anything beyond a year is a typo, and it keeps the arithmetic far from overflow.
    if !(0.0..=31_536_000.0).contains(&seconds) {
        return Err("a duration must be between 0 and one year".to_string());
    }
    Ok(Duration::from_secs_f64(seconds))
}

/// Parses a size: bytes as a plain number, or a number followed by B, KiB, MiB, GiB, KB, MB or GB.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let multiplier: u64 = match unit.trim() {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "KB" | "kB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        other => {
            return Err(format!(
                "unknown unit \"{other}\": use B, KiB, MiB, GiB, KB, MB or GB"
            ));
        }
    };
    let number: u64 = number
        .parse()
        .map_err(|_| format!("\"{number}\" is not a whole number"))?;
    number
        .checked_mul(multiplier)
        .ok_or_else(|| "the size is too large".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_with_their_units() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2s"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert!(parse_duration("5").is_err());
        assert!(parse_duration("5x").is_err());
        assert!(parse_duration("s").is_err());
        assert!(parse_duration("99999h").is_err());
    }

    #[test]
    fn sizes_read_with_binary_and_decimal_units() {
        assert_eq!(parse_size("65536"), Ok(65536));
        assert_eq!(parse_size("64KiB"), Ok(65536));
        assert_eq!(parse_size("10MiB"), Ok(10 << 20));
        assert_eq!(parse_size("1GB"), Ok(1_000_000_000));
        assert!(parse_size("10 parsecs").is_err());
        assert!(parse_size("-1").is_err());
        assert!(parse_size("99999999999999GiB").is_err());
    }
}
