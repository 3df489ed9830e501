use super::*;

fn net(s: &str) -> Ipv4Net {
    s.parse().expect("test cidr")
}

fn ip(s: &str) -> Ipv4Addr {
    s.parse().expect("test ip")
}

#[test]
fn parse_accepts_networks() {
    for s in [
        "10.10.0.0/16",
        "10.0.0.0/8",
        "192.168.1.0/24",
        "172.16.0.16/28",
        "10.20.30.0/23",
    ] {
        assert_eq!(parse_network_cidr(s), Ok(net(s)), "{s}");
    }
}

#[test]
fn parse_rejects() {
    use std::mem::discriminant as kind;
    let malformed = IpamError::Malformed(String::new());
    let v6 = IpamError::Ipv6(String::new());
    let no_prefix = IpamError::MissingPrefix(String::new());
    let range = IpamError::PrefixOutOfRange {
        input: String::new(),
        prefix: 0,
    };
    let host = IpamError::NotNetworkAddress {
        input: String::new(),
        suggestion: net("0.0.0.0/0"),
    };
    let cases = [
        ("fd00::/64", &v6),
        ("::1/128", &v6),
        ("10.10.0.0", &no_prefix),
        ("garbage", &no_prefix),
        ("10.10.0.0/", &malformed),
        ("10.10.0.0/+16", &malformed),
        ("10.10.0.0/-16", &malformed),
        ("10.10.0.0/ 16", &malformed),
        (" 10.10.0.0/16", &malformed),
        ("10.10.0.0/16 ", &malformed),
        ("10.10.0.0/33", &malformed),
        ("10.10.0.0/016", &malformed),
        ("10.10.0.0/16/16", &malformed),
        ("10.10.0/16", &malformed),
        ("10.10.0.256/24", &malformed),
        ("a.b.c.d/16", &malformed),
        ("/16", &malformed),
        ("10.0.0.0/7", &range),
        ("0.0.0.0/0", &range),
        ("10.0.0.0/29", &range),
        ("10.0.0.0/32", &range),
        ("10.10.0.1/16", &host),
        ("10.10.0.255/24", &host),
    ];
    for (input, want) in cases {
        let got = parse_network_cidr(input).expect_err(input);
        assert_eq!(kind(&got), kind(want), "{input:?}: got {got}");
        assert!(got.to_string().contains(&format!("{input:?}")), "{got}");
    }
    assert_eq!(parse_network_cidr(""), Err(IpamError::Empty));
}

#[test]
fn host_bits_suggest_the_network() {
    let err = parse_network_cidr("10.10.0.1/16").expect_err("host bits");
    assert_eq!(
        err.to_string(),
        r#"cidr "10.10.0.1/16" is not a network address (did you mean 10.10.0.0/16?)"#
    );
    let err = parse_network_cidr("10.0.0.0/30").expect_err("too small");
    assert!(err.to_string().contains("/8 to /28"), "{err}");
}

#[test]
fn gateway_is_first_host() {
    assert_eq!(gateway(&net("10.10.0.0/16")), ip("10.10.0.1"));
    assert_eq!(gateway(&net("192.168.7.16/28")), ip("192.168.7.17"));
}

#[test]
fn overlap_cases() {
    let cases = [
        ("10.10.0.0/16", "10.10.0.0/16", true),
        ("10.10.0.0/16", "10.10.5.0/24", true),
        ("10.10.5.0/24", "10.10.0.0/16", true),
        ("10.0.0.0/8", "10.255.255.240/28", true),
        ("10.10.0.0/16", "10.11.0.0/16", false),
        ("10.10.0.0/24", "10.10.1.0/24", false),
        ("192.168.0.0/28", "192.168.0.16/28", false),
        ("10.10.0.0/23", "10.10.1.0/24", true),
    ];
    for (a, b, want) in cases {
        assert_eq!(overlaps(&net(a), &net(b)), want, "{a} vs {b}");
    }
}

#[test]
fn allocate_exhausts_a_slash_28() {
    let n = net("10.0.0.0/28");
    let mut used = HashSet::new();
    for _ in 0..13 {
        let a = allocate(&n, &used, 0).expect("a free address");
        assert!(n.contains(&a));
        assert_ne!(a, n.network());
        assert_ne!(a, gateway(&n));
        assert_ne!(a, n.broadcast());
        assert!(used.insert(a), "{a} handed out twice");
    }
    assert_eq!(allocate(&n, &used, 0), None);
    assert_eq!(allocate(&n, &used, 7), None);
    let want: HashSet<Ipv4Addr> = (2..=14).map(|i| Ipv4Addr::new(10, 0, 0, i)).collect();
    assert_eq!(used, want);
}

#[test]
fn allocate_starts_at_hint_and_wraps() {
    let n = net("10.0.0.0/28");
    let none = HashSet::new();
    assert_eq!(allocate(&n, &none, 0), Some(ip("10.0.0.2")));
    assert_eq!(allocate(&n, &none, 5), Some(ip("10.0.0.7")));
    assert_eq!(allocate(&n, &none, 12), Some(ip("10.0.0.14")));
    // The hint wraps modulo the 13 instance addresses.
    assert_eq!(allocate(&n, &none, 13), Some(ip("10.0.0.2")));
    assert_eq!(allocate(&n, &none, u32::MAX), Some(ip("10.0.0.10")));
    // From the top, past used addresses, round to the bottom.
    let used: HashSet<Ipv4Addr> = [ip("10.0.0.13"), ip("10.0.0.14")].into();
    assert_eq!(allocate(&n, &used, 11), Some(ip("10.0.0.2")));
    // Addresses outside the network in `used` change nothing.
    let used: HashSet<Ipv4Addr> = [ip("10.0.1.2")].into();
    assert_eq!(allocate(&n, &used, 0), Some(ip("10.0.0.2")));
}

#[test]
fn allocate_in_a_large_network() {
    let n = net("10.0.0.0/8");
    let used: HashSet<Ipv4Addr> = [ip("10.0.0.2")].into();
    assert_eq!(allocate(&n, &used, 0), Some(ip("10.0.0.3")));
    assert_eq!(allocate(&n, &used, 16_777_212), Some(ip("10.255.255.254")));
    assert_eq!(allocate(&n, &used, 16_777_213), Some(ip("10.0.0.3")));
}

#[test]
fn allocate_in_networks_too_small_for_instances() {
    let none = HashSet::new();
    assert_eq!(
        allocate(&net("10.0.0.0/30"), &none, 0),
        Some(ip("10.0.0.2"))
    );
    assert_eq!(allocate(&net("10.0.0.0/31"), &none, 0), None);
    assert_eq!(allocate(&net("10.0.0.0/32"), &none, 0), None);
    assert_eq!(allocate(&net("255.255.255.255/32"), &none, 0), None);
}

#[test]
fn host_allocation_uses_every_host_address_and_reports_full() {
    let net: Ipv4Net = "10.96.0.0/30".parse().unwrap();
    let mut used = HashSet::new();
    let a = allocate_host(&net, &used, 0).unwrap();
    assert_eq!(a, Ipv4Addr::new(10, 96, 0, 1));
    used.insert(a);
    let b = allocate_host(&net, &used, 0).unwrap();
    assert_eq!(b, Ipv4Addr::new(10, 96, 0, 2));
    used.insert(b);
    assert_eq!(allocate_host(&net, &used, 7), None);
}

#[test]
fn vni_allocation_takes_the_smallest_free() {
    let mut used: HashSet<u32> = [FIRST_VNI, FIRST_VNI + 1, FIRST_VNI + 3]
        .into_iter()
        .collect();
    assert_eq!(allocate_vni(&used), Some(FIRST_VNI + 2));
    used.insert(FIRST_VNI + 2);
    assert_eq!(allocate_vni(&used), Some(FIRST_VNI + 4));
}
