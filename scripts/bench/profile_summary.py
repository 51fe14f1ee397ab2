#!/usr/bin/env python3
"""Groups a flat `perf report` (self time per symbol) into the kinds of work a training step
does, so a profile reads as "where the step's time goes by op".

Usage: perf report -i perf.data --no-children --sort symbol -g none --percent-limit 0 \
         | scripts/bench/profile_summary.py
"""
import re
import sys

# First match wins: (kind, pattern over the symbol name).
KINDS = [
    # loractl's fused kernels run as rayon loop bodies, inlined into these.
    ("fused loractl kernels (norms, softmax, geglu, im2col)", r"loractl_trainer::fused|ForEachConsumer"),
    ("gemm (matmul, conv)", r"gemm|microkernel"),
    ("page faults, zeroing new pages", r"clear_page|page_fault|do_anonymous_page|handle_mm_fault|folio|lru|alloc_pages|__rmqueue|get_page_from_freelist|memcg|_raw_spin|zap_|unmap|free_pages|free_unref|release_pages|tlb|sync_regs|native_irq|irqentry|error_entry|asm_exc"),
    ("conv im2col / copies", r"im2col|copy_strided|copy2d|memmove|memcpy|copy_storage|Tensor::copy|contiguous"),
    ("memset (zero-fill)", r"memset|zeros_impl|alloc_zeroed|calloc"),
    ("exp/erf (softmax, silu, gelu)", r"expf|erf|exp_|tanh"),
    ("elementwise binary", r"binary_map|Map2|BinaryOp|binary_"),
    ("elementwise unary / affine", r"unary_map|Map1|UnaryOp|affine|Affine|cmp|where_"),
    # candle's per-element closures (unary and binary maps) when not inlined
    ("elementwise closures", r"FnMut<A> for &F>::call_mut|FnOnce"),
    ("reductions (sum, mean, max)", r"reduce|Reduce|sum_|ReduceSum|fast_sum|fast_max|vec_dot"),
    ("allocator", r"malloc|free|_int_|cfree|realloc|brk|mmap"),
    ("threads (rayon, futex, scheduler)", r"rayon|crossbeam|futex|sched|schedule|switch|__lll|pthread|syscall|entry_SYSCALL|do_syscall|idle|wake|spin"),
    ("random init (setup)", r"rand|Normal|chacha|distr"),
]

def main():
    totals = {}
    other = []
    for line in sys.stdin:
        m = re.match(r"\s*([0-9.]+)%\s+\[[.k]\]\s+(.*?)(\s+-\s+-)?\s*$", line)
        if not m:
            continue
        pct, sym = float(m.group(1)), m.group(2)
        for kind, pat in KINDS:
            if re.search(pat, sym):
                totals[kind] = totals.get(kind, 0.0) + pct
                break
        else:
            totals["other"] = totals.get("other", 0.0) + pct
            other.append((pct, sym))
    for kind, pct in sorted(totals.items(), key=lambda kv: -kv[1]):
        print(f"{pct:6.1f}%  {kind}")
    other.sort(reverse=True)
    if other:
        print("largest unclassified:")
        for pct, sym in other[:8]:
            print(f"  {pct:5.1f}%  {sym[:110]}")

if __name__ == "__main__":
    main()
