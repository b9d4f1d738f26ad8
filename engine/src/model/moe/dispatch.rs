//! Stage 2, dispatch: group the N*A (token, choice) slots by expert so each expert sees one
//! contiguous run of rows. A stable counting sort: within an expert, slots keep token order.

use candle_core::Result;
use moe_kernels::dispatch::dispatch_reference;

/// Where every (token, choice) slot goes. With S = N*A slots:
#[derive(Debug, Clone, PartialEq)]
pub struct Dispatch {
    pub num_experts: usize,
    pub top_k: usize,
    /// `[E]` slots routed to each expert.
    pub counts: Vec<u32>,
    /// `[E+1]` expert e owns sorted rows `offsets[e]..offsets[e+1]`.
    pub offsets: Vec<u32>,
    /// `[S]` for each sorted row, the token it came from.
    pub row_token: Vec<u32>,
    /// `[S]` for slot `n*A + j` (token n's j-th choice), its sorted row.
    pub slot_row: Vec<u32>,
}

impl Dispatch {
    /// The rows of experts `ids` (in that order) as a dispatch over `ids.len()` experts (expert
    /// `ids[i]` becomes expert i; `slot_row` is left empty), and those rows' positions in this
    /// dispatch's row order: how a hybrid placement hands each executor its experts' rows.
    pub fn subset(&self, ids: &[usize]) -> (Dispatch, Vec<u32>) {
        let mut offsets = vec![0u32];
        let (mut row_token, mut rows, mut counts) = (Vec::new(), Vec::new(), Vec::new());
        for &e in ids {
            let (lo, hi) = (self.offsets[e], self.offsets[e + 1]);
            row_token.extend_from_slice(&self.row_token[lo as usize..hi as usize]);
            rows.extend(lo..hi);
            counts.push(self.counts[e]);
            offsets.push(row_token.len() as u32);
        }
        let d = Dispatch {
            num_experts: ids.len(),
            top_k: self.top_k,
            counts,
            offsets,
            row_token,
            slot_row: Vec::new(),
        };
        (d, rows)
    }
}

/// `ids [N*A]` token-major expert ids (as in [`super::Routing`]). The sort is
/// `moe_kernels::dispatch::dispatch_reference` with no padding (block 1), the specification the
/// CUDA dispatch kernel is checked against. An id >= `num_experts` is an error.
pub fn dispatch(ids: &[u32], top_k: usize, num_experts: usize) -> Result<Dispatch> {
    let d = dispatch_reference(ids, top_k, num_experts, 1)?;
    Ok(Dispatch {
        num_experts,
        top_k,
        counts: d.counts,
        offsets: d.offsets,
        row_token: d.row_token,
        slot_row: d.slot_row,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_by_expert_and_keeps_token_order() {
        // 3 tokens, top-2, 4 experts; expert 3 receives no token.
        let ids = [1, 0, 0, 2, 1, 2];
        let d = dispatch(&ids, 2, 4).unwrap();
        assert_eq!(d.counts, vec![2, 2, 2, 0]);
        assert_eq!(d.offsets, vec![0, 2, 4, 6, 6]);
        assert_eq!(d.row_token, vec![0, 1, 0, 2, 1, 2]);
        // Every slot maps to a row holding its own token and expert.
        for (slot, &row) in d.slot_row.iter().enumerate() {
            assert_eq!(d.row_token[row as usize], (slot / 2) as u32);
            let e = ids[slot] as usize;
            assert!(d.offsets[e] <= row && row < d.offsets[e + 1]);
        }
    }

    #[test]
    fn every_expert_used() {
        let ids: Vec<u32> = (0..16).map(|i| i % 8).collect(); // 8 tokens top-2 over 8 experts
        let d = dispatch(&ids, 2, 8).unwrap();
        assert!(d.counts.iter().all(|&c| c == 2));
        let mut rows = d.slot_row.clone();
        rows.sort();
        assert_eq!(
            rows,
            (0..16).collect::<Vec<u32>>(),
            "slot_row is a permutation"
        );
    }

    #[test]
    fn bad_expert_id_is_an_error() {
        assert!(dispatch(&[0, 5], 1, 3).is_err());
    }

    #[test]
    fn no_tokens() {
        let d = dispatch(&[], 2, 3).unwrap();
        assert_eq!(d.offsets, vec![0, 0, 0, 0]);
        assert!(d.row_token.is_empty());
    }
}
