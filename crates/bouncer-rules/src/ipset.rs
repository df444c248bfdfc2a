//! Sets of IP addresses built from addresses and CIDR blocks, for deny and allow lists.
//!
//! Every address is placed in one 128-bit space: IPv6 as it is, IPv4 as its IPv4-mapped IPv6
//! address (`::ffff:a.b.c.d`), so that an IPv4 block matches both a plain IPv4 peer and the same
//! peer seen through a dual-stack socket. The blocks are merged into sorted, disjoint ranges, and
//! a lookup is one binary search: a million blocks take 20 comparisons and 32 bytes each.

use std::net::IpAddr;

use ipnet::IpNet;

/// An immutable set of addresses.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IpSet {
    /// Inclusive ranges, sorted, neither overlapping nor touching.
    ranges: Vec<(u128, u128)>,
}

impl IpSet {
    /// The set of every block in `blocks`.
    pub fn new(blocks: impl IntoIterator<Item = IpNet>) -> IpSet {
        let mut ranges: Vec<(u128, u128)> = blocks.into_iter().map(range_of).collect();
        ranges.sort_unstable();
        let mut merged: Vec<(u128, u128)> = Vec::with_capacity(ranges.len());
        for (start, end) in ranges {
            match merged.last_mut() {
                Some(last) if start <= last.1.saturating_add(1) => last.1 = last.1.max(end),
                _ => merged.push((start, end)),
            }
        }
        merged.shrink_to_fit();
        IpSet { ranges: merged }
    }

    pub fn contains(&self, address: IpAddr) -> bool {
        let point = point_of(address);
        // The first range that starts after the point; the one before it may hold the point.
        let after = self.ranges.partition_point(|&(start, _)| start <= point);
        after > 0 && self.ranges[after - 1].1 >= point
    }

    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }

    /// Disjoint ranges after merging (not the number of blocks given).
    pub fn range_count(&self) -> usize {
        self.ranges.len()
    }
}

fn point_of(address: IpAddr) -> u128 {
    match address {
        IpAddr::V4(v4) => u128::from(v4.to_ipv6_mapped()),
        IpAddr::V6(v6) => u128::from(v6),
    }
}

fn range_of(block: IpNet) -> (u128, u128) {
    match block {
        IpNet::V4(v4) => {
            let start = u128::from(v4.network().to_ipv6_mapped());
            let end = u128::from(v4.broadcast().to_ipv6_mapped());
            (start, end)
        }
        // An IPv4-mapped block (`::ffff:10.0.0.0/104`) also covers the IPv4 addresses in it,
        // which live in the same place.
        IpNet::V6(v6) => (u128::from(v6.network()), u128::from(v6.broadcast())),
    }
}

/// A line of a list file that is neither an address, a block, a comment nor blank.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListLineError {
    /// 1-based.
    pub line: usize,
    pub text: String,
}

impl std::fmt::Display for ListLineError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "line {}: \"{}\" is not an IP address or CIDR block",
            self.line, self.text
        )
    }
}

/// Reads a list file: one address or CIDR block a line; `#` and `;` start comments (FireHOL's
/// netsets and Spamhaus DROP, whose lines read `1.2.3.0/24 ; SBL123`). Malformed lines are
/// returned with their numbers, and the rest is used.
pub fn parse_ip_list(text: &str) -> (Vec<IpNet>, Vec<ListLineError>) {
    let mut blocks = Vec::new();
    let mut errors = Vec::new();
    for (index, line) in text.lines().enumerate() {
        let content = line.split(['#', ';']).next().unwrap_or_default().trim();
        if content.is_empty() {
            continue;
        }
        match parse_block(content) {
            Some(block) => blocks.push(block),
            None => errors.push(ListLineError {
                line: index + 1,
                text: content.chars().take(80).collect(),
            }),
        }
    }
    (blocks, errors)
}

/// An address (a block of one) or a CIDR block; host bits set under the mask are cleared.
pub fn parse_block(text: &str) -> Option<IpNet> {
    if let Ok(block) = text.parse::<IpNet>() {
        return Some(block.trunc());
    }
    text.parse::<IpAddr>().ok().map(IpNet::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(blocks: &[&str]) -> IpSet {
        IpSet::new(
            blocks
                .iter()
                .map(|block| parse_block(block).expect("a block")),
        )
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().expect("an address")
    }

    #[test]
    fn blocks_match_their_addresses_and_nothing_else() {
        let list = set(&["203.0.113.0/24", "2001:db8::/32", "198.51.100.7"]);
        assert!(list.contains(ip("203.0.113.0")));
        assert!(list.contains(ip("203.0.113.255")));
        assert!(!list.contains(ip("203.0.114.0")));
        assert!(!list.contains(ip("203.0.112.255")));
        assert!(list.contains(ip("198.51.100.7")));
        assert!(!list.contains(ip("198.51.100.8")));
        assert!(list.contains(ip("2001:db8:ffff::1")));
        assert!(!list.contains(ip("2001:db9::")));
        // An IPv4 peer seen on a dual-stack socket is the same peer.
        assert!(list.contains(ip("::ffff:203.0.113.9")));
        assert!(!list.contains(ip("::203.0.113.9")));
    }

    #[test]
    fn overlapping_and_adjacent_blocks_merge() {
        let list = set(&[
            "10.0.0.0/9",
            "10.128.0.0/9",
            "10.0.0.0/16",
            "10.255.255.255",
        ]);
        assert_eq!(list.range_count(), 1);
        assert!(list.contains(ip("10.200.1.1")));
        assert!(!list.contains(ip("11.0.0.0")));
        let everything = set(&["0.0.0.0/0", "::/0"]);
        assert!(everything.contains(ip("1.2.3.4")));
        assert!(everything.contains(ip("::1")));
        assert!(!IpSet::default().contains(ip("1.2.3.4")));
    }

    #[test]
    fn list_files_of_the_usual_formats_are_read_and_bad_lines_reported() {
        let text = "\
; Spamhaus DROP List 2026/11/28
1.10.16.0/20 ; SBL256894
# FireHOL netset
192.0.2.1
2001:db8::/48   # a comment
not-an-address
10.0.0.300/8
198.51.100.77/24
";
        let (blocks, errors) = parse_ip_list(text);
        assert_eq!(blocks.len(), 4);
        assert_eq!(
            errors,
            vec![
                ListLineError {
                    line: 6,
                    text: "not-an-address".into()
                },
                ListLineError {
                    line: 7,
                    text: "10.0.0.300/8".into()
                },
            ]
        );
        // Host bits under the mask are cleared: the block is the /24.
        let list = IpSet::new(blocks);
        assert!(list.contains(ip("198.51.100.1")));
        assert!(list.contains(ip("1.10.31.255")));
    }

    #[test]
    fn a_million_blocks_fit_and_are_found() {
        let blocks = (0..1_000_000u32).map(|index| {
            let base = 0x0B00_0000u32 + index * 4;
            IpNet::V4(ipnet::Ipv4Net::new(base.into(), 31).expect("a /31"))
        });
        let list = IpSet::new(blocks);
        assert_eq!(list.range_count(), 1_000_000);
        assert!(list.contains(IpAddr::V4((0x0B00_0000u32 + 400_000 * 4 + 1).into())));
        assert!(!list.contains(IpAddr::V4((0x0B00_0000u32 + 400_000 * 4 + 2).into())));
    }
}
