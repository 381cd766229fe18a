//! `memcpy`, `memmove`, `memset`, `memcmp` and `bcmp`: the C symbols the
//! compiler calls for copies and comparisons. On the Linux target they
//! come from the C library, which a freestanding kernel does not link, so
//! they are here, in assembly (string instructions), where the compiler
//! cannot turn them back into calls to themselves.
//!
//! # Contexts
//! Any; they touch only the memory their arguments name.

core::arch::global_asm!(
    ".pushsection .text.dvma_mem, \"ax\"",
    // memcpy(dst, src, n) -> dst
    ".globl memcpy",
    ".p2align 4",
    "memcpy:",
    "mov rax, rdi",
    "mov rcx, rdx",
    "rep movsb",
    "ret",
    // memmove(dst, src, n) -> dst: backwards when dst is above src.
    ".globl memmove",
    ".p2align 4",
    "memmove:",
    "mov rax, rdi",
    "mov rcx, rdx",
    "cmp rdi, rsi",
    "jbe 2f",
    "lea rsi, [rsi + rcx - 1]",
    "lea rdi, [rdi + rcx - 1]",
    "std",
    "rep movsb",
    "cld",
    "ret",
    "2:",
    "rep movsb",
    "ret",
    // memset(dst, c, n) -> dst
    ".globl memset",
    ".p2align 4",
    "memset:",
    "mov r9, rdi",
    "mov eax, esi",
    "mov rcx, rdx",
    "rep stosb",
    "mov rax, r9",
    "ret",
    // memcmp(a, b, n) / bcmp(a, b, n): byte difference of the first
    // mismatch, or 0.
    ".globl memcmp",
    ".globl bcmp",
    ".p2align 4",
    "memcmp:",
    "bcmp:",
    "xor eax, eax",
    "test rdx, rdx",
    "jz 4f",
    "3:",
    "movzx eax, byte ptr [rdi]",
    "movzx ecx, byte ptr [rsi]",
    "sub eax, ecx",
    "jnz 4f",
    "inc rdi",
    "inc rsi",
    "dec rdx",
    "jnz 3b",
    "4:",
    "ret",
    ".popsection",
);
