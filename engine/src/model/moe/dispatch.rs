//! Stage 2, dispatch: group the N*A (token, choice) slots by expert so each expert sees one
//! contiguous run of rows. A stable counting sort: within an expert, slots keep token order.

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

/// `ids [N*A]` token-major expert ids (as in [`super::Routing`]).
pub fn dispatch(ids: &[u32], top_k: usize, num_experts: usize) -> Dispatch {
    let mut counts = vec![0u32; num_experts];
    for &e in ids {
        counts[e as usize] += 1;
    }
    let mut offsets = Vec::with_capacity(num_experts + 1);
    offsets.push(0u32);
    for &c in &counts {
        offsets.push(offsets.last().unwrap() + c);
    }
    let mut next: Vec<u32> = offsets[..num_experts].to_vec();
    let mut row_token = vec![0u32; ids.len()];
    let mut slot_row = vec![0u32; ids.len()];
    for (slot, &e) in ids.iter().enumerate() {
        let row = next[e as usize];
        next[e as usize] += 1;
        row_token[row as usize] = (slot / top_k) as u32;
        slot_row[slot] = row;
    }
    Dispatch {
        num_experts,
        top_k,
        counts,
        offsets,
        row_token,
        slot_row,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_by_expert_and_keeps_token_order() {
        // 3 tokens, top-2, 4 experts; expert 3 receives no token.
        let ids = [1, 0, 0, 2, 1, 2];
        let d = dispatch(&ids, 2, 4);
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
        let d = dispatch(&ids, 2, 8);
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
    fn no_tokens() {
        let d = dispatch(&[], 2, 3);
        assert_eq!(d.offsets, vec![0, 0, 0, 0]);
        assert!(d.row_token.is_empty());
    }
}
