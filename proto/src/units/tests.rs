use super::*;

#[test]
fn cpu_accepts() {
    let cases = [
        ("2", 2000),
        ("0.5", 500),
        ("500m", 500),
        ("1.25", 1250),
        ("1", 1000),
        ("0.001", 1),
        ("1m", 1),
        ("1500m", 1500),
        ("0.5000", 500),
        ("2.0", 2000),
        ("007", 7000),
        ("100000", 100_000_000),
        ("100000000m", 100_000_000),
        ("99999.999", 99_999_999),
    ];
    for (input, want) in cases {
        assert_eq!(parse_cpu(input), Ok(want), "input {input:?}");
    }
}

#[test]
fn cpu_rejects() {
    use std::mem::discriminant as kind;
    let malformed = UnitError::Malformed {
        quantity: Quantity::Cpu,
        input: String::new(),
    };
    let zero = UnitError::Zero {
        quantity: Quantity::Cpu,
        input: String::new(),
    };
    let precise = UnitError::TooPrecise {
        quantity: Quantity::Cpu,
        input: String::new(),
    };
    let large = UnitError::TooLarge {
        quantity: Quantity::Cpu,
        input: String::new(),
        max: String::new(),
    };
    let cases = [
        ("-1", &malformed),
        ("-0.5", &malformed),
        ("+1", &malformed),
        ("NaN", &malformed),
        ("nan", &malformed),
        ("inf", &malformed),
        ("infinity", &malformed),
        (" 1", &malformed),
        ("1 ", &malformed),
        ("1 m", &malformed),
        ("0. 5", &malformed),
        ("1e3", &malformed),
        ("abc", &malformed),
        ("1,5", &malformed),
        (".5", &malformed),
        ("5.", &malformed),
        ("1..5", &malformed),
        ("1.2.3", &malformed),
        ("m", &malformed),
        ("500M", &malformed),
        ("500mm", &malformed),
        ("2cores", &malformed),
        ("0x10", &malformed),
        ("१", &malformed),
        ("0", &zero),
        ("0.0", &zero),
        ("0m", &zero),
        ("000", &zero),
        ("0.0001", &precise),
        ("0.0005", &precise),
        ("1.2345", &precise),
        ("0.5m", &precise),
        ("100000.001", &large),
        ("100001", &large),
        ("100000001m", &large),
        ("99999999999999999999999999999999999999999999", &large),
        ("99999999999999999999999999999999999999999999m", &large),
    ];
    for (input, want) in cases {
        let got = parse_cpu(input).expect_err(input);
        assert_eq!(kind(&got), kind(want), "input {input:?}: got {got}");
        let msg = got.to_string();
        assert!(msg.contains(&format!("{input:?}")), "{msg}");
        assert!(msg.contains("500m"), "says what is accepted: {msg}");
    }
    assert_eq!(
        parse_cpu(""),
        Err(UnitError::Empty {
            quantity: Quantity::Cpu
        })
    );
}

#[test]
fn memory_accepts() {
    const MI: u64 = 1 << 20;
    let cases = [
        ("64MiB", 64 * MI),
        ("64Mi", 64 * MI),
        ("64mib", 64 * MI),
        ("64MB", 64_000_000),
        ("64M", 64_000_000),
        ("64mb", 64_000_000),
        ("4GB", 4_000_000_000),
        ("4gb", 4_000_000_000),
        ("4Gb", 4_000_000_000),
        ("4G", 4_000_000_000),
        ("4GiB", 4 << 30),
        ("4Gi", 4 << 30),
        ("512MB", 512_000_000),
        ("1.5GB", 1_500_000_000),
        ("1.5GiB", 3 << 29),
        ("0.5GiB", 1 << 29),
        ("1TB", 1_000_000_000_000),
        ("1TiB", 1 << 40),
        ("1ti", 1 << 40),
        ("8192K", 8_192_000),
        ("4096KiB", 4 * MI),
        ("5000kb", 5_000_000),
        ("4194304", 4 * MI),
        ("4194304B", 4 * MI),
        ("4194304b", 4 * MI),
        ("4.0MiB", 4 * MI),
        ("4.000000000000MiB", 4 * MI),
        // Fractions of a byte round down.
        ("8.1234567MB", 8_123_456),
        ("16777215TiB", 16_777_215 << 40),
        ("18446744073709551615", u64::MAX),
        ("18446744073709551615B", u64::MAX),
        ("18446744.073709551TB", 18_446_744_073_709_551_000),
    ];
    for (input, want) in cases {
        assert_eq!(parse_memory(input), Ok(want), "input {input:?}");
    }
}

#[test]
fn memory_rejects() {
    use std::mem::discriminant as kind;
    let malformed = UnitError::Malformed {
        quantity: Quantity::Memory,
        input: String::new(),
    };
    let zero = UnitError::Zero {
        quantity: Quantity::Memory,
        input: String::new(),
    };
    let precise = UnitError::TooPrecise {
        quantity: Quantity::Memory,
        input: String::new(),
    };
    let large = UnitError::TooLarge {
        quantity: Quantity::Memory,
        input: String::new(),
        max: String::new(),
    };
    let unit = UnitError::UnknownUnit {
        input: String::new(),
        unit: String::new(),
    };
    let small = UnitError::TooSmall {
        input: String::new(),
        bytes: 0,
    };
    let cases = [
        ("-64MB", &malformed),
        ("+64MB", &malformed),
        ("64 MB", &malformed),
        (" 64MB", &malformed),
        ("64MB ", &malformed),
        ("6 4MB", &malformed),
        ("MB", &malformed),
        ("GiB", &malformed),
        (".5GB", &malformed),
        ("5.GB", &malformed),
        ("1.2.3GB", &malformed),
        ("NaN", &malformed),
        ("inf", &malformed),
        ("1e9", &malformed),
        ("64MB!", &malformed),
        ("64M-B", &malformed),
        ("4GBs", &unit),
        ("4XB", &unit),
        ("4PB", &unit),
        ("4iB", &unit),
        ("4i", &unit),
        ("4bb", &unit),
        ("4KiBB", &unit),
        ("4mbi", &unit),
        ("4bytes", &unit),
        ("0", &zero),
        ("0MB", &zero),
        ("0.0GiB", &zero),
        ("1.0000000001GB", &precise),
        ("18446744073709551616", &large),
        ("18446744073709551616B", &large),
        ("16777216TiB", &large),
        ("18446745TB", &large),
        ("99999999999999999999999999999999999999999999GB", &large),
        ("1", &small),
        ("4MB", &small),
        ("4000KiB", &small),
        ("4194303", &small),
        ("0.000000001GB", &small),
        ("0.000000001B", &small),
    ];
    for (input, want) in cases {
        let got = parse_memory(input).expect_err(input);
        assert_eq!(kind(&got), kind(want), "input {input:?}: got {got}");
        let msg = got.to_string();
        assert!(msg.contains(&format!("{input:?}")), "{msg}");
    }
    assert_eq!(
        parse_memory(""),
        Err(UnitError::Empty {
            quantity: Quantity::Memory
        })
    );
}

#[test]
fn messages_say_what_is_accepted() {
    let unit = parse_memory("4GBs")
        .expect_err("must be refused")
        .to_string();
    assert!(unit.contains("unknown unit \"GBs\""), "{unit}");
    assert!(unit.contains("MiB") && unit.contains("GB"), "{unit}");
    let small = parse_memory("1MB")
        .expect_err("must be refused")
        .to_string();
    assert!(small.contains("too small for a container"), "{small}");
    assert!(small.contains("4MiB"), "{small}");
    let cpu = parse_cpu("0.0001")
        .expect_err("must be refused")
        .to_string();
    assert!(cpu.contains("too precise") && cpu.contains("500m"), "{cpu}");
    let large = parse_cpu("200000")
        .expect_err("must be refused")
        .to_string();
    assert!(large.contains("100000 cores"), "{large}");
    assert!(parse_cpu("")
        .expect_err("must be refused")
        .to_string()
        .starts_with("cpu is empty"));
}

#[test]
fn format_cpu_cases() {
    let cases = [
        (500, "0.5"),
        (2000, "2"),
        (1250, "1.25"),
        (1, "0.001"),
        (10, "0.01"),
        (1001, "1.001"),
        (0, "0"),
        (100_000_000, "100000"),
    ];
    for (millis, want) in cases {
        assert_eq!(format_cpu(millis), want, "{millis}");
    }
}

#[test]
fn format_memory_cases() {
    let cases = [
        (64 << 20, "64MiB"),
        (64_000_000, "64MB"),
        (4_000_000_000, "4GB"),
        (4 << 30, "4GiB"),
        (3 << 29, "1536MiB"),
        (1_500_000_000, "1500MB"),
        (1 << 40, "1TiB"),
        (1024, "1KiB"),
        (2000, "2KB"),
        (1536, "1536B"),
        (1, "1B"),
        (0, "0B"),
        (u64::MAX, "18446744073709551615B"),
    ];
    for (bytes, want) in cases {
        assert_eq!(format_memory(bytes), want, "{bytes}");
    }
}

#[test]
fn format_parse_round_trip() {
    for millis in [
        1,
        7,
        10,
        100,
        500,
        999,
        1000,
        1250,
        2000,
        123_456,
        100_000_000,
    ] {
        assert_eq!(parse_cpu(&format_cpu(millis)), Ok(millis));
    }
    for bytes in [
        4 << 20,
        64 << 20,
        64_000_000,
        4_000_000_000,
        (4 << 20) + 1,
        1 << 40,
        u64::MAX,
    ] {
        assert_eq!(parse_memory(&format_memory(bytes)), Ok(bytes));
    }
}
