//! The cpu and memory quantities users type (`"0.5"`, `"500m"`, `"64MiB"`, `"4GB"`), parsed into the
//! integers berth stores (millicores, bytes) and printed back for humans.
//!
//! Parsing is strict on purpose: a quantity that is almost right (`"4GBs"`, `"0.5 "`, `"1e3"`) is an error
//! naming what was wrong and what is accepted, never a guess.

/// Largest cpu request accepted, in cores: far above any real machine, low enough that a typo is caught.
pub const MAX_CPU_CORES: u64 = 100_000;

/// Smallest memory limit accepted: below this a container cannot even start its runtime.
pub const MIN_MEMORY_BYTES: u64 = 4 * 1024 * 1024;

/// Most fractional digits accepted in a memory quantity; keeps the arithmetic exact.
const MAX_MEMORY_DECIMALS: usize = 9;

const CPU_ACCEPTED: &str =
    r#"expected cores like "2", "0.5", "1.25" (at most 3 decimals) or millicores like "500m""#;
const MEMORY_ACCEPTED: &str = r#"expected a number with an optional unit: B, K/KB, M/MB, G/GB, T/TB (powers of 1000) or Ki/KiB, Mi/MiB, Gi/GiB, Ti/TiB (powers of 1024), like "64MiB", "512MB" or "4GB""#;

/// Which quantity an error is about; also says what that quantity accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Quantity {
    /// A cpu amount (cores or millicores).
    Cpu,
    /// A memory amount (bytes with a unit).
    Memory,
}

impl Quantity {
    fn accepted(self) -> &'static str {
        match self {
            Quantity::Cpu => CPU_ACCEPTED,
            Quantity::Memory => MEMORY_ACCEPTED,
        }
    }
}

impl std::fmt::Display for Quantity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Quantity::Cpu => "cpu",
            Quantity::Memory => "memory",
        })
    }
}

/// Why a cpu or memory quantity was refused. Each message names the input and what is accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UnitError {
    /// Nothing was given.
    #[error("{quantity} is empty; {}", .quantity.accepted())]
    Empty {
        /// Which quantity.
        quantity: Quantity,
    },
    /// Not a plain decimal number (signs, spaces, exponents, NaN, stray characters).
    #[error("invalid {quantity} {input:?}: not a plain decimal number; {}", .quantity.accepted())]
    Malformed {
        /// Which quantity.
        quantity: Quantity,
        /// What the user typed.
        input: String,
    },
    /// The number is zero.
    #[error("invalid {quantity} {input:?}: must be greater than zero; {}", .quantity.accepted())]
    Zero {
        /// Which quantity.
        quantity: Quantity,
        /// What the user typed.
        input: String,
    },
    /// More precision than can be represented (cpu finer than 1m, memory with too many decimals).
    #[error("invalid {quantity} {input:?}: too precise; {}", .quantity.accepted())]
    TooPrecise {
        /// Which quantity.
        quantity: Quantity,
        /// What the user typed.
        input: String,
    },
    /// Larger than berth accepts or can represent.
    #[error("invalid {quantity} {input:?}: too large (at most {max}); {}", .quantity.accepted())]
    TooLarge {
        /// Which quantity.
        quantity: Quantity,
        /// What the user typed.
        input: String,
        /// The limit, as a human would write it.
        max: String,
    },
    /// A memory unit berth does not know.
    #[error("invalid memory {input:?}: unknown unit {unit:?}; {MEMORY_ACCEPTED}")]
    UnknownUnit {
        /// What the user typed.
        input: String,
        /// The unit part of it.
        unit: String,
    },
    /// A memory amount too small for any container.
    #[error(
        "invalid memory {input:?}: {bytes} bytes is too small for a container (at least 4MiB)"
    )]
    TooSmall {
        /// What the user typed.
        input: String,
        /// What it came to.
        bytes: u64,
    },
}

/// A decimal number split into its integer digits and its fractional digits (trailing zeros removed).
struct Decimal<'a> {
    int: &'a str,
    frac: &'a str,
}

/// Splits `digits[.digits]`; anything else (signs, spaces, exponents, `.5`, `5.`) is `None`.
fn split_decimal(s: &str) -> Option<Decimal<'_>> {
    let (int, frac) = match s.split_once('.') {
        Some((int, frac)) => (int, Some(frac)),
        None => (s, None),
    };
    let all_digits = |p: &str| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit());
    if !all_digits(int) || frac.is_some_and(|f| !all_digits(f)) {
        return None;
    }
    Some(Decimal {
        int,
        frac: frac.unwrap_or("").trim_end_matches('0'),
    })
}

/// Parses a string of ASCII digits; `None` when it does not fit in a u128.
fn digits_value(digits: &str) -> Option<u128> {
    digits.bytes().try_fold(0u128, |acc, b| {
        acc.checked_mul(10)?.checked_add(u128::from(b - b'0'))
    })
}

/// Parses a cpu quantity into millicores: `"2"` → 2000, `"0.5"` → 500, `"500m"` → 500.
pub fn parse_cpu(s: &str) -> Result<u64, UnitError> {
    let q = Quantity::Cpu;
    let malformed = || UnitError::Malformed {
        quantity: q,
        input: s.to_owned(),
    };
    if s.is_empty() {
        return Err(UnitError::Empty { quantity: q });
    }
    let max_millis = u128::from(MAX_CPU_CORES) * 1000;
    let millis: u128 = if let Some(m) = s.strip_suffix('m') {
        let d = split_decimal(m).ok_or_else(malformed)?;
        if !d.frac.is_empty() {
            return Err(UnitError::TooPrecise {
                quantity: q,
                input: s.to_owned(),
            });
        }
        // Saturating: a number too long for u128 is simply "too large".
        digits_value(d.int).unwrap_or(u128::MAX)
    } else {
        let d = split_decimal(s).ok_or_else(malformed)?;
        if d.frac.len() > 3 {
            return Err(UnitError::TooPrecise {
                quantity: q,
                input: s.to_owned(),
            });
        }
        let frac = format!("{:0<3}", d.frac);
        digits_value(d.int)
            .and_then(|i| i.checked_mul(1000))
            .and_then(|i| i.checked_add(digits_value(&frac)?))
            .unwrap_or(u128::MAX)
    };
    if millis == 0 {
        return Err(UnitError::Zero {
            quantity: q,
            input: s.to_owned(),
        });
    }
    if millis > max_millis {
        return Err(UnitError::TooLarge {
            quantity: q,
            input: s.to_owned(),
            max: format!("{MAX_CPU_CORES} cores"),
        });
    }
    // In range: at most MAX_CPU_CORES * 1000, which fits in u64.
    Ok(millis as u64)
}

/// Multiplier of a memory unit, or `None` when the unit is unknown. Case-insensitive.
fn memory_unit(unit: &str) -> Option<u64> {
    let u = unit.to_ascii_lowercase();
    let (stem, binary) = match u.strip_suffix("ib").or_else(|| u.strip_suffix('i')) {
        Some(stem) => (stem, true),
        None => (u.strip_suffix('b').unwrap_or(&u), false),
    };
    let power = match stem {
        "" if !binary => 0,
        "k" => 1,
        "m" => 2,
        "g" => 3,
        "t" => 4,
        _ => return None,
    };
    let base: u64 = if binary { 1024 } else { 1000 };
    Some(base.pow(power))
}

/// Parses a memory quantity into bytes: `"64MiB"` → 67108864, `"4GB"` → 4000000000, `"1.5GB"` →
/// 1500000000, `"8388608"` → 8388608. Fractions of a byte are rounded down.
pub fn parse_memory(s: &str) -> Result<u64, UnitError> {
    let q = Quantity::Memory;
    if s.is_empty() {
        return Err(UnitError::Empty { quantity: q });
    }
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (number, unit) = s.split_at(split);
    let d = split_decimal(number).ok_or_else(|| UnitError::Malformed {
        quantity: q,
        input: s.to_owned(),
    })?;
    let multiplier = memory_unit(unit).ok_or_else(|| {
        if unit.chars().all(|c| c.is_ascii_alphabetic()) {
            UnitError::UnknownUnit {
                input: s.to_owned(),
                unit: unit.to_owned(),
            }
        } else {
            UnitError::Malformed {
                quantity: q,
                input: s.to_owned(),
            }
        }
    })?;
    if d.frac.len() > MAX_MEMORY_DECIMALS {
        return Err(UnitError::TooPrecise {
            quantity: q,
            input: s.to_owned(),
        });
    }
    let too_large = || UnitError::TooLarge {
        quantity: q,
        input: s.to_owned(),
        max: format!("{} bytes", u64::MAX),
    };
    let int = digits_value(d.int)
        .and_then(|i| i.checked_mul(u128::from(multiplier)))
        .ok_or_else(too_large)?;
    // At most 9 digits times a multiplier below 2^41: exact in u128.
    let frac_digits = digits_value(d.frac).unwrap_or(0);
    let frac = frac_digits * u128::from(multiplier) / 10u128.pow(d.frac.len() as u32);
    let total = int.checked_add(frac).ok_or_else(too_large)?;
    let bytes = u64::try_from(total).map_err(|_| too_large())?;
    if int == 0 && frac_digits == 0 {
        return Err(UnitError::Zero {
            quantity: q,
            input: s.to_owned(),
        });
    }
    if bytes < MIN_MEMORY_BYTES {
        return Err(UnitError::TooSmall {
            input: s.to_owned(),
            bytes,
        });
    }
    Ok(bytes)
}

/// Prints millicores as cores: 500 → `"0.5"`, 2000 → `"2"`, 1250 → `"1.25"`.
pub fn format_cpu(millis: u64) -> String {
    let (cores, frac) = (millis / 1000, millis % 1000);
    if frac == 0 {
        cores.to_string()
    } else {
        let frac = format!("{frac:03}");
        format!("{cores}.{}", frac.trim_end_matches('0'))
    }
}

/// Prints bytes exactly, in the unit that gives the smallest whole number: binary (`"64MiB"`) or decimal
/// (`"64MB"`, so that a value typed as "64MB" does not come back as "62500KiB"), else plain bytes
/// (`"1536B"`). Binary wins a tie.
pub fn format_memory(bytes: u64) -> String {
    const BINARY: [(u64, &str); 4] = [
        (1 << 40, "TiB"),
        (1 << 30, "GiB"),
        (1 << 20, "MiB"),
        (1 << 10, "KiB"),
    ];
    const DECIMAL: [(u64, &str); 4] = [
        (1_000_000_000_000, "TB"),
        (1_000_000_000, "GB"),
        (1_000_000, "MB"),
        (1_000, "KB"),
    ];
    if bytes == 0 {
        return "0B".to_owned();
    }
    let exact = |units: &[(u64, &'static str)]| {
        units
            .iter()
            .find(|(m, _)| bytes.is_multiple_of(*m))
            .map(|&(m, unit)| (bytes / m, unit))
    };
    let best = match (exact(&BINARY), exact(&DECIMAL)) {
        (Some(b), Some(d)) => Some(if d.0 < b.0 { d } else { b }),
        (b, d) => b.or(d),
    };
    match best {
        Some((n, unit)) => format!("{n}{unit}"),
        None => format!("{bytes}B"),
    }
}

#[cfg(test)]
mod tests;
