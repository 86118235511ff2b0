//! Stable hashing: the same bytes give the same number on every node, build and version.
//!
//! `std`'s `DefaultHasher` is explicitly unstable across releases, so partitioning and
//! definition fingerprints use 64-bit FNV-1a instead.

const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const PRIME: u64 = 0x0000_0100_0000_01b3;

/// 64-bit FNV-1a of `bytes`.
pub fn fnv1a(bytes: &[u8]) -> u64 {
    fnv1a_parts(&[bytes])
}

/// 64-bit FNV-1a of the concatenation of `parts`, without building it.
pub fn fnv1a_parts(parts: &[&[u8]]) -> u64 {
    parts.iter().fold(OFFSET, |h, part| {
        part.iter()
            .fold(h, |h, b| (h ^ u64::from(*b)).wrapping_mul(PRIME))
    })
}

/// The partition (`0..partitions`) a saga id belongs to.
pub fn partition_of(saga_id: &str, partitions: u32) -> u32 {
    (fnv1a(saga_id.as_bytes()) % u64::from(partitions.max(1))) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnv1a_matches_reference_vectors() {
        // Reference values from the FNV specification's test suite.
        assert_eq!(fnv1a(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a(b"foobar"), 0x8594_4171_f739_67e8);
        assert_eq!(fnv1a_parts(&[b"foo", b"", b"bar"]), fnv1a(b"foobar"));
        assert_eq!(fnv1a_parts(&[]), fnv1a(b""));
    }

    #[test]
    fn partition_is_in_range_and_stable() {
        for p in [1u32, 7, 32] {
            let a = partition_of("order-42", p);
            assert!(a < p);
            assert_eq!(a, partition_of("order-42", p));
        }
    }
}
