// SPDX-License-Identifier: MIT OR Apache-2.0
//! First-fit allocator for regions of the flat SLOTS array.

/// A contiguous run of SLOTS entries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Region {
    pub off: u32,
    pub len: u32,
}

/// Free space in SLOTS, kept sorted by offset and coalesced.
#[derive(Debug)]
pub struct Allocator {
    free: Vec<Region>,
    capacity: u32,
}

impl Allocator {
    pub fn new(capacity: u32) -> Self {
        Self { free: vec![Region { off: 0, len: capacity }], capacity }
    }

    pub fn capacity(&self) -> u32 {
        self.capacity
    }

    /// Entries not allocated.
    pub fn available(&self) -> u32 {
        self.free.iter().map(|r| r.len).sum()
    }

    /// A region of `len` entries, or `None` when no free run is long enough.
    pub fn alloc(&mut self, len: u32) -> Option<Region> {
        let len = len.max(1);
        let i = self.free.iter().position(|r| r.len >= len)?;
        let r = &mut self.free[i];
        let out = Region { off: r.off, len };
        r.off += len;
        r.len -= len;
        if r.len == 0 {
            self.free.remove(i);
        }
        Some(out)
    }

    /// Marks `region` as used (recovering the layout of a pinned SLOTS map).
    /// False when part of it is not free (overlapping or out of range).
    pub fn reserve(&mut self, region: Region) -> bool {
        let len = region.len.max(1);
        let Some(i) = self.free.iter().position(|r| r.off <= region.off && region.off + len <= r.off + r.len) else {
            return false;
        };
        let r = self.free[i];
        let before = Region { off: r.off, len: region.off - r.off };
        let after = Region { off: region.off + len, len: r.off + r.len - region.off - len };
        self.free.remove(i);
        for part in [after, before] {
            if part.len > 0 {
                self.free.insert(i, part);
            }
        }
        true
    }

    /// Returns a region obtained from [`Allocator::alloc`].
    pub fn release(&mut self, region: Region) {
        let i = self.free.partition_point(|r| r.off < region.off);
        self.free.insert(i, region);
        // Coalesce with the neighbours.
        if i + 1 < self.free.len() && self.free[i].off + self.free[i].len == self.free[i + 1].off {
            self.free[i].len += self.free[i + 1].len;
            self.free.remove(i + 1);
        }
        if i > 0 && self.free[i - 1].off + self.free[i - 1].len == self.free[i].off {
            self.free[i - 1].len += self.free[i].len;
            self.free.remove(i);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alloc_release_coalesces() {
        let mut a = Allocator::new(100);
        let x = a.alloc(30).unwrap();
        let y = a.alloc(30).unwrap();
        let z = a.alloc(40).unwrap();
        assert!(a.alloc(1).is_none());
        a.release(y);
        assert_eq!(a.alloc(31), None);
        a.release(x);
        assert_eq!(a.alloc(60), Some(Region { off: 0, len: 60 }));
        a.release(Region { off: 0, len: 60 });
        a.release(z);
        assert_eq!(a.available(), 100);
        assert_eq!(a.alloc(100), Some(Region { off: 0, len: 100 }));
    }

    #[test]
    fn reserve_splits_free_runs() {
        let mut a = Allocator::new(100);
        assert!(a.reserve(Region { off: 10, len: 20 }));
        assert!(a.reserve(Region { off: 50, len: 50 }));
        assert!(!a.reserve(Region { off: 20, len: 5 }), "overlaps");
        assert!(!a.reserve(Region { off: 95, len: 10 }), "out of range");
        assert_eq!(a.available(), 30);
        assert_eq!(a.alloc(10), Some(Region { off: 0, len: 10 }));
        assert_eq!(a.alloc(20), Some(Region { off: 30, len: 20 }));
        a.release(Region { off: 10, len: 20 });
        assert_eq!(a.alloc(20), Some(Region { off: 10, len: 20 }));
    }
}
