//! Maglev lookup-table construction (Eisenbud et al., NSDI 2016, section 3.4), with weights.
//!
//! Each backend walks its own permutation of the `m` slots (`offset + j * skip mod m`, with `m`
//! prime so every permutation visits every slot) and the backends take turns claiming the next
//! free slot of their permutation. Weights are honoured by credit: on each turn a backend gains
//! its weight and places one entry per `max_weight` of credit, so shares follow the weights.
//!
//! The table is a function of the backend *set*: backends are ordered by their identity before
//! the build, so the same set always yields the same table whatever order it was given in.

/// Marks a slot that no backend claimed (no backends, or all weights zero).
pub const EMPTY: usize = usize::MAX;

/// A backend as the builder sees it: a stable identity (e.g. address and port) and a weight.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Member {
    pub id: u64,
    pub weight: u32,
}

fn splitmix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

pub use crate::config::is_prime;

/// Builds a table of `m` slots (`m` prime). Each slot holds an index into `members`, or
/// [`EMPTY`].
pub fn build(members: &[Member], m: u32) -> Vec<usize> {
    assert!(is_prime(m), "maglev table size {m} must be prime");
    let m64 = u64::from(m);
    let mut table = vec![EMPTY; m as usize];

    // Stable order: by identity, so the result depends on the set only.
    let mut order: Vec<usize> = (0..members.len())
        .filter(|&i| members[i].weight > 0)
        .collect();
    order.sort_by_key(|&i| members[i].id);
    if order.is_empty() {
        return table;
    }
    let max_weight = order.iter().map(|&i| members[i].weight).max().unwrap_or(1);

    struct Walk {
        index: usize,
        weight: u32,
        offset: u64,
        skip: u64,
        next: u64,
        credit: u32,
    }
    let mut walks: Vec<Walk> = order
        .iter()
        .map(|&i| {
            let id = members[i].id;
            Walk {
                index: i,
                weight: members[i].weight,
                offset: splitmix64(id ^ 0x6d61_676c_6576_0001) % m64,
                skip: splitmix64(id ^ 0x6d61_676c_6576_0002) % (m64 - 1) + 1,
                next: 0,
                credit: 0,
            }
        })
        .collect();

    let mut filled = 0usize;
    while filled < table.len() {
        for w in walks.iter_mut() {
            w.credit += w.weight;
            if w.credit < max_weight {
                continue;
            }
            w.credit -= max_weight;
            loop {
                let slot = ((w.offset + w.next * w.skip) % m64) as usize;
                w.next += 1;
                if table[slot] == EMPTY {
                    table[slot] = w.index;
                    filled += 1;
                    break;
                }
            }
            if filled == table.len() {
                break;
            }
        }
    }
    table
}

#[cfg(test)]
mod tests {
    use super::*;

    fn members(n: usize) -> Vec<Member> {
        (0..n)
            .map(|i| Member {
                id: 0x0a00_0000_1f40 + ((i as u64) << 16),
                weight: 1,
            })
            .collect()
    }

    fn shares(table: &[usize], n: usize) -> Vec<f64> {
        let mut c = vec![0usize; n];
        for &s in table {
            c[s] += 1;
        }
        c.into_iter()
            .map(|x| x as f64 / table.len() as f64)
            .collect()
    }

    #[test]
    fn primes() {
        assert!(is_prime(65_537) && is_prime(251) && is_prime(2) && is_prime(7));
        assert!(!is_prime(65_535) && !is_prime(1) && !is_prime(0) && !is_prime(9));
    }

    #[test]
    fn every_slot_filled_and_balanced() {
        let t = build(&members(10), 65_537);
        assert!(t.iter().all(|&s| s < 10));
        for s in shares(&t, 10) {
            assert!((s - 0.1).abs() < 0.01, "share {s}");
        }
    }

    #[test]
    fn empty_set_gives_empty_table() {
        assert!(build(&[], 251).iter().all(|&s| s == EMPTY));
        let zero = [Member { id: 1, weight: 0 }];
        assert!(build(&zero, 251).iter().all(|&s| s == EMPTY));
    }

    #[test]
    fn weights_are_honoured() {
        let mut ms = members(3);
        ms[0].weight = 1;
        ms[1].weight = 2;
        ms[2].weight = 3;
        let s = shares(&build(&ms, 65_537), 3);
        for (got, want) in s.iter().zip([1.0 / 6.0, 2.0 / 6.0, 3.0 / 6.0]) {
            assert!((got - want).abs() < 0.01, "{s:?}");
        }
    }

    #[test]
    fn order_of_members_does_not_matter() {
        let ms = members(7);
        let mut rev = ms.clone();
        rev.reverse();
        let a: Vec<u64> = build(&ms, 4099).iter().map(|&i| ms[i].id).collect();
        let b: Vec<u64> = build(&rev, 4099).iter().map(|&i| rev[i].id).collect();
        assert_eq!(a, b);
    }

    /// The Maglev paper's disruption experiment: remove k of N backends and measure the share
    /// of slots whose backend changed. Ideal is k/N (only the removed backends' slots move);
    /// Maglev moves a little more. We require at most 1.5 x k/N + 1% and print the figures.
    #[test]
    fn removing_k_of_n_moves_about_k_over_n() {
        let m = 65_537;
        let n = 100;
        let all = members(n);
        let before: Vec<u64> = build(&all, m).iter().map(|&i| all[i].id).collect();
        for k in [1usize, 5, 10, 20] {
            let kept: Vec<Member> = all[k..].to_vec();
            let after: Vec<u64> = build(&kept, m).iter().map(|&i| kept[i].id).collect();
            let moved = before.iter().zip(&after).filter(|(a, b)| a != b).count();
            let frac = moved as f64 / f64::from(m);
            let ideal = k as f64 / n as f64;
            println!(
                "maglev M={m} N={n}: removed k={k}: moved {frac:.4} of slots (ideal k/N = {ideal:.4})"
            );
            assert!(
                frac >= ideal - 1e-9,
                "fewer than the removed backends' slots moved"
            );
            assert!(frac <= ideal * 1.5 + 0.01, "moved {frac} for ideal {ideal}");
        }
    }
}
