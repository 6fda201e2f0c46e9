//! The name columns of the window tables as the query files see them:
//! string views made from the held dictionary columns.
//!
//! Every part of a window table carries its names as 4-byte keys into one
//! shared array of all the names (the interner's, see
//! [`crate::intern::Interner::arrow_values`]). Arrow's cast makes a view per
//! row from the name's bytes; this makes one view per name, once for as long
//! as the names do not change, and then copies a 16-byte view per row: the
//! cast was about an eighth of the query thread's samples in the array bench.

use std::sync::{Arc, Mutex};

use arrow::array::{Array, ArrayRef, AsArray, DictionaryArray, StringArray, StringViewArray};
use arrow::buffer::ScalarBuffer;
use arrow::datatypes::{DataType, Field, FieldRef, UInt32Type};
use datafusion::common::Result;
use datafusion::logical_expr::{
    ColumnarValue, ReturnFieldArgs, ScalarFunctionArgs, ScalarUDFImpl, Signature, Volatility,
};

/// `names_as_views(dictionary)`: the column's names as a `Utf8View` column.
#[derive(Debug)]
pub(super) struct NamesAsViews {
    signature: Signature,
    /// The names arrays views were made for, and their views, most recently
    /// used first (a table has up to four name columns, each with its own names).
    made: Mutex<Vec<(ArrayRef, Arc<[u128]>)>>,
}

/// The function's name in plans ([`super::grouped`] looks for it).
pub(super) const NAME: &str = "names_as_views";

/// Names arrays whose views are remembered.
const REMEMBERED: usize = 8;

impl NamesAsViews {
    pub(super) fn new() -> Self {
        NamesAsViews {
            signature: Signature::exact(vec![crate::decode::name_type()], Volatility::Immutable),
            made: Mutex::new(Vec::new()),
        }
    }

    /// The views of every name in `names` (`strings`, the same array):
    /// remembered from an earlier call with the same array, else made now —
    /// unless the names outnumber the rows about to use them by far (a small
    /// part of a big plant, first seen), when `None` leaves the part to the
    /// cast, which looks only at the names it uses.
    fn views_of(
        &self,
        names: &ArrayRef,
        strings: &StringArray,
        rows: usize,
    ) -> Option<Arc<[u128]>> {
        let mut made = self.made.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(i) = made.iter().position(|(held, _)| Arc::ptr_eq(held, names)) {
            made[..=i].rotate_right(1);
            return Some(made[0].1.clone());
        }
        if strings.len() > 4 * rows + 1024 {
            return None;
        }
        let offsets = strings.value_offsets();
        let views: Arc<[u128]> = (0..strings.len())
            .map(|i| {
                let (start, end) = (offsets[i] as usize, offsets[i + 1] as usize);
                let bytes = &strings.values()[start..end];
                arrow::array::builder::make_view(bytes, 0, start as u32)
            })
            .collect();
        made.insert(0, (names.clone(), views.clone()));
        made.truncate(REMEMBERED);
        Some(views)
    }

    fn convert(&self, column: &ArrayRef) -> Result<ArrayRef> {
        let dict = column.as_dictionary::<UInt32Type>();
        let names = dict.values();
        // Names are never null, and their bytes are addressed by u32 offsets.
        let views = names
            .as_string_opt::<i32>()
            .filter(|s| s.null_count() == 0 && u32::try_from(s.values().len()).is_ok())
            .and_then(|strings| Some((strings, self.views_of(names, strings, dict.len())?)));
        match views {
            Some((strings, views)) => Ok(Arc::new(gather(dict, strings, &views))),
            None => Ok(arrow::compute::cast(column, &DataType::Utf8View)?),
        }
    }

    #[cfg(test)]
    fn is_made_for(&self, names: &ArrayRef) -> bool {
        let made = self.made.lock().unwrap_or_else(|e| e.into_inner());
        made.iter().any(|(held, _)| Arc::ptr_eq(held, names))
    }
}

/// The views of `dict`'s rows, `views` being those of its names (`strings`).
fn gather(
    dict: &DictionaryArray<UInt32Type>,
    strings: &StringArray,
    views: &[u128],
) -> StringViewArray {
    // A null row's key may be anything: it gets the empty view.
    let rows: ScalarBuffer<u128> = dict
        .keys()
        .values()
        .iter()
        .map(|&k| views.get(k as usize).copied().unwrap_or(0))
        .collect();
    let nulls = dict.keys().nulls().cloned();
    // SAFETY: each view is made by `make_view` from a name of `strings`
    // (valid UTF-8, as every string array is), at the name's own offset in
    // buffer 0, which is `strings`' value buffer (its length fits in u32,
    // checked by the caller); a null row's view is the empty string's.
    unsafe { StringViewArray::new_unchecked(rows, vec![strings.values().clone()], nulls) }
}

impl PartialEq for NamesAsViews {
    fn eq(&self, _: &Self) -> bool {
        // One function: what it remembers is a cache, not its identity.
        true
    }
}

impl Eq for NamesAsViews {}

impl std::hash::Hash for NamesAsViews {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.name().hash(state);
    }
}

impl ScalarUDFImpl for NamesAsViews {
    fn name(&self) -> &str {
        NAME
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, _: &[DataType]) -> Result<DataType> {
        Ok(DataType::Utf8View)
    }

    /// Null where the held column is (as the cast it replaces).
    fn return_field_from_args(&self, args: ReturnFieldArgs) -> Result<FieldRef> {
        let nullable = args.arg_fields.first().is_none_or(|f| f.is_nullable());
        Ok(Arc::new(Field::new(
            self.name(),
            DataType::Utf8View,
            nullable,
        )))
    }

    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        match args.args.into_iter().next() {
            Some(ColumnarValue::Array(a)) => Ok(ColumnarValue::Array(self.convert(&a)?)),
            Some(ColumnarValue::Scalar(s)) => {
                Ok(ColumnarValue::Scalar(s.cast_to(&DataType::Utf8View)?))
            }
            None => datafusion::common::plan_err!("names_as_views takes one column"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::UInt32Array;

    fn names() -> ArrayRef {
        Arc::new(StringArray::from(vec![
            "m-1",
            "",
            "temperature_c",
            "a-name-much-longer-than-twelve-bytes",
            "twelve bytes",
            "ünïcødé-machine",
        ]))
    }

    /// The views read as the cast's, row for row: short and long names, the
    /// empty one, nulls, keys of a sliced column, and again from what is remembered.
    #[test]
    fn the_views_are_the_casts() {
        let f = NamesAsViews::new();
        let names = names();
        for keys in [
            UInt32Array::from(vec![0, 2, 3, 1, 4, 5, 2, 2, 0]),
            UInt32Array::from(vec![Some(3), None, Some(5), None, Some(0)]),
            UInt32Array::from(vec![5, 4, 3, 2, 1, 0, 3]).slice(2, 4),
            UInt32Array::from(Vec::<u32>::new()),
        ] {
            let dict: ArrayRef =
                Arc::new(DictionaryArray::<UInt32Type>::try_new(keys, names.clone()).unwrap());
            let want = arrow::compute::cast(&dict, &DataType::Utf8View).unwrap();
            for _ in 0..2 {
                let got = f.convert(&dict).unwrap();
                assert_eq!(got.data_type(), &DataType::Utf8View);
                assert_eq!(
                    got.as_string_view().iter().collect::<Vec<_>>(),
                    want.as_string_view().iter().collect::<Vec<_>>()
                );
            }
        }
        assert!(f.is_made_for(&names), "the views are remembered");
        // New names (a new array): made again for them.
        let more: ArrayRef = Arc::new(StringArray::from(vec!["x", "a-second-long-name-here"]));
        let dict: ArrayRef = Arc::new(
            DictionaryArray::<UInt32Type>::try_new(UInt32Array::from(vec![1, 0]), more.clone())
                .unwrap(),
        );
        let got = f.convert(&dict).unwrap();
        assert_eq!(
            got.as_string_view().iter().flatten().collect::<Vec<_>>(),
            ["a-second-long-name-here", "x"]
        );
        assert!(f.is_made_for(&more));
        assert!(f.is_made_for(&names), "both are remembered");
        // The least recently used goes first once more than REMEMBERED are seen.
        let others: Vec<ArrayRef> = (0..REMEMBERED)
            .map(|i| Arc::new(StringArray::from(vec![format!("name-{i}")])) as ArrayRef)
            .collect();
        for o in &others {
            let dict: ArrayRef = Arc::new(
                DictionaryArray::<UInt32Type>::try_new(UInt32Array::from(vec![0]), o.clone())
                    .unwrap(),
            );
            f.convert(&dict).unwrap();
        }
        assert!(!f.is_made_for(&names) && !f.is_made_for(&more));
        assert!(others.iter().all(|o| f.is_made_for(o)));
    }

    /// Names sliced out of a bigger array keep their own offsets.
    #[test]
    fn sliced_names_are_read_where_they_are() {
        let f = NamesAsViews::new();
        let names: ArrayRef = names().slice(2, 3);
        let dict: ArrayRef = Arc::new(
            DictionaryArray::<UInt32Type>::try_new(UInt32Array::from(vec![2, 0, 1]), names)
                .unwrap(),
        );
        let got = f.convert(&dict).unwrap();
        assert_eq!(
            got.as_string_view().iter().flatten().collect::<Vec<_>>(),
            [
                "twelve bytes",
                "temperature_c",
                "a-name-much-longer-than-twelve-bytes"
            ]
        );
    }
}
