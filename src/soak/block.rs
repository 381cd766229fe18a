//! The soak's block format: every 4 KiB block written carries a header (a
//! magic, its byte offset, the write's generation, the connection's tag)
//! and a checksum over the whole block; the payload is derived from the
//! offset, the generation and the tag. [`check_block`] says whether a block
//! read back is the one the model expects, and if not what it found.

/// The block the model tracks: every request is a whole number of them.
pub const BLOCK: usize = 4096;
/// The first word of every block the soak writes.
const MAGIC: u64 = u64::from_le_bytes(*b"dvmasoak");
/// The header: magic, offset, generation, tag, checksum.
const HEADER: usize = 40;

/// A small, fast, reproducible generator (splitmix64).
#[derive(Debug, Clone)]
pub(super) struct Rng(pub(super) u64);

impl Rng {
    pub(super) fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        mix(self.0)
    }

    pub(super) fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
}

pub(super) fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn word(b: &[u8], i: usize) -> u64 {
    u64::from_le_bytes(b[i * 8..i * 8 + 8].try_into().expect("8 bytes"))
}

/// The checksum of a block: every word but the checksum's own (word 4).
fn checksum(b: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for i in (0..BLOCK / 8).filter(|&i| i != 4) {
        h = (h ^ word(b, i))
            .wrapping_mul(0x0000_0100_0000_01b3)
            .rotate_left(29);
    }
    h
}

/// Fills `b` (one block) with the contents of generation `generation` of
/// the block at byte `offset`, written by the connection tagged `tag`.
pub fn fill_block(b: &mut [u8], offset: u64, generation: u64, tag: u64) {
    b[0..8].copy_from_slice(&MAGIC.to_le_bytes());
    b[8..16].copy_from_slice(&offset.to_le_bytes());
    b[16..24].copy_from_slice(&generation.to_le_bytes());
    b[24..32].copy_from_slice(&tag.to_le_bytes());
    let mut r = Rng(mix(offset
        ^ generation.rotate_left(32)
        ^ tag.rotate_left(17)));
    for c in b[HEADER..BLOCK].chunks_mut(8) {
        c.copy_from_slice(&r.next_u64().to_le_bytes());
    }
    let sum = checksum(b);
    b[32..40].copy_from_slice(&sum.to_le_bytes());
}

/// Checks a block read at byte `offset` against the model: generation
/// `generation` (0: never written, all zeros) by connection `tag`. `None`
/// if it matches, else what was found.
pub fn check_block(b: &[u8], offset: u64, generation: u64, tag: u64) -> Option<String> {
    if generation == 0 {
        if b.iter().all(|&x| x == 0) {
            return None;
        }
        return Some(format!(
            "offset {offset:#x}: never written, want zeros; found {}",
            describe(b)
        ));
    }
    let ok = word(b, 0) == MAGIC
        && word(b, 1) == offset
        && word(b, 2) == generation
        && word(b, 3) == tag
        && word(b, 4) == checksum(b);
    if ok {
        return None;
    }
    Some(format!(
        "offset {offset:#x}: want generation {generation} (tag {tag:#x}); found {}",
        describe(b)
    ))
}

fn describe(b: &[u8]) -> String {
    if b.iter().all(|&x| x == 0) {
        return "zeros".to_string();
    }
    if word(b, 0) != MAGIC {
        return format!("no header (first bytes {:02x?})", &b[..16]);
    }
    format!(
        "header of offset {:#x} generation {} tag {:#x}, checksum {}",
        word(b, 1),
        word(b, 2),
        word(b, 3),
        if word(b, 4) == checksum(b) {
            "good"
        } else {
            "BAD"
        }
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn block(offset: u64, generation: u64, tag: u64) -> Vec<u8> {
        let mut b = vec![0; BLOCK];
        fill_block(&mut b, offset, generation, tag);
        b
    }

    #[test]
    fn a_block_checks_against_its_own_model_only() {
        let b = block(0x3000, 7, 0x10);
        assert_eq!(check_block(&b, 0x3000, 7, 0x10), None);
        // Stale generation, misdirected block, another connection's data.
        assert!(check_block(&b, 0x3000, 8, 0x10).is_some());
        assert!(check_block(&b, 0x4000, 7, 0x10).is_some());
        assert!(check_block(&b, 0x3000, 7, 0x11).is_some());
        // Never written: zeros only.
        assert!(check_block(&b, 0x3000, 0, 0x10).is_some());
        assert_eq!(check_block(&[0; BLOCK], 0x3000, 0, 0x10), None);
        assert!(check_block(&[0; BLOCK], 0x3000, 1, 0x10).is_some());
    }

    #[test]
    fn any_flipped_bit_is_a_mismatch() {
        let b = block(0x10000, 3, 1);
        for bit in [0, 8 * 40, 8 * 41 + 3, 8 * BLOCK - 1, 8 * 2000 + 5] {
            let mut c = b.clone();
            c[bit / 8] ^= 1 << (bit % 8);
            let m = check_block(&c, 0x10000, 3, 1);
            assert!(m.is_some(), "bit {bit}");
        }
        // A torn block: first half of one generation, second of another.
        let mut t = block(0x10000, 3, 1);
        t[BLOCK / 2..].copy_from_slice(&block(0x10000, 4, 1)[BLOCK / 2..]);
        assert!(check_block(&t, 0x10000, 3, 1).is_some());
        assert!(check_block(&t, 0x10000, 4, 1).is_some());
    }
}
