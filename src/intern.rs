//! String interning with a cap: machines, devices and metrics become small
//! integer ids once, so per-entity state lives in `Vec`s indexed by id rather
//! than in maps keyed by strings, and a flood of invented names cannot grow
//! memory without bound.

use std::collections::HashMap;
use std::sync::Arc;

/// The entry of `id` in a table indexed by interned ids, made on first use.
/// Ids are dense and capped by their interner, so the table is too.
pub fn entry<T>(table: &mut Vec<Option<T>>, id: u32, make: impl FnOnce() -> T) -> &mut T {
    slot(table, id).get_or_insert_with(make)
}

/// The place of `id` in `table`, grown to hold it.
pub fn slot<T>(table: &mut Vec<Option<T>>, id: u32) -> &mut Option<T> {
    let i = id as usize;
    if table.len() <= i {
        table.resize_with(i + 1, || None);
    }
    &mut table[i]
}

/// Maps names to dense ids `0..len`, refusing new names past `cap`.
#[derive(Debug)]
pub struct Interner {
    /// foldhash: several lookups per message make the hash a visible cost
    /// (SipHash was 3 % of the whole pipeline); it is seeded per process, so
    /// names crafted to collide cannot be precomputed.
    ids: HashMap<Arc<str>, u32, foldhash::fast::RandomState>,
    names: Vec<Arc<str>>,
    cap: usize,
    refused: u64,
    /// The names as an Arrow array, while no name was added since it was built.
    arrow: Option<arrow::array::ArrayRef>,
}

impl Interner {
    /// An empty interner that holds at most `cap` names.
    pub fn new(cap: usize) -> Self {
        Interner {
            ids: HashMap::default(),
            names: Vec::new(),
            cap,
            refused: 0,
            arrow: None,
        }
    }

    /// The id of `name`, adding it if there is room; `None` once the cap is reached.
    pub fn intern(&mut self, name: &str) -> Option<u32> {
        if let Some(&id) = self.ids.get(name) {
            return Some(id);
        }
        if self.names.len() >= self.cap {
            self.refused += 1;
            return None;
        }
        let id = self.names.len() as u32;
        let name: Arc<str> = Arc::from(name);
        self.ids.insert(name.clone(), id);
        self.names.push(name);
        self.arrow = None;
        Some(id)
    }

    /// The id of `name` if it is known.
    pub fn get(&self, name: &str) -> Option<u32> {
        self.ids.get(name).copied()
    }

    /// The name behind an id.
    pub fn name(&self, id: u32) -> &Arc<str> {
        &self.names[id as usize]
    }

    /// How many more names may be added before the cap.
    pub fn room(&self) -> usize {
        self.cap.saturating_sub(self.names.len())
    }

    /// How many names are held.
    pub fn len(&self) -> usize {
        self.names.len()
    }

    /// Whether no name is held.
    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }

    /// Every name, in id order (for snapshots).
    pub fn names(&self) -> &[Arc<str>] {
        &self.names
    }

    /// Every name as an Arrow string array in id order: the values of the
    /// dictionary columns whose keys are these ids (window tables carry
    /// names as 4-byte keys, not as copies of the text). Rebuilt only after
    /// names were added, so batches share one array once the plant is known
    /// (and concatenating their columns needs no merge).
    pub fn arrow_values(&mut self) -> arrow::array::ArrayRef {
        self.arrow
            .get_or_insert_with(|| {
                Arc::new(arrow::array::StringArray::from_iter_values(
                    self.names.iter().map(|n| &**n),
                ))
            })
            .clone()
    }

    /// An interner holding `names` with ids in their order (restoring a snapshot).
    pub fn from_names<S: AsRef<str>>(names: &[S], cap: usize) -> Self {
        let mut i = Interner::new(cap.max(names.len()));
        for n in names {
            i.intern(n.as_ref());
        }
        i.cap = cap;
        i
    }

    /// How many new names were refused because the cap was reached.
    pub fn refused(&self) -> u64 {
        self.refused
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_dense_and_stable() {
        let mut i = Interner::new(10);
        assert_eq!(i.intern("a"), Some(0));
        assert_eq!(i.intern("b"), Some(1));
        assert_eq!(i.intern("a"), Some(0));
        assert_eq!(&**i.name(1), "b");
        assert_eq!(i.get("c"), None);
    }

    #[test]
    fn arrow_values_follow_the_names() {
        let mut i = Interner::new(10);
        i.intern("a");
        let first = i.arrow_values();
        assert!(
            Arc::ptr_eq(&first, &i.arrow_values()),
            "kept while unchanged"
        );
        i.intern("b");
        let second = i.arrow_values();
        let names = second
            .as_any()
            .downcast_ref::<arrow::array::StringArray>()
            .unwrap();
        assert_eq!(names.iter().flatten().collect::<Vec<_>>(), ["a", "b"]);
    }

    #[test]
    fn cap_holds_against_a_spray() {
        let mut i = Interner::new(100);
        for n in 0..10_000 {
            i.intern(&format!("rogue-{n}"));
        }
        assert_eq!(i.len(), 100);
        assert_eq!(i.refused(), 9_900);
        assert_eq!(i.intern("rogue-5"), Some(5));
    }
}
