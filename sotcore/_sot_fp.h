/* Exact floating point for the kernels between SOT_EXACT_FP_BEGIN and
 * SOT_EXACT_FP_END: no contraction of a * b + c into an FMA unless written as
 * one (fmaf / _mm*_fmadd_ps), so every CPU path and compiler clone does the
 * same IEEE operations in the same order and gives the same bits. */
#ifndef SOTCORE_SOT_FP_H
#define SOTCORE_SOT_FP_H

#if defined(__clang__)
#define SOT_EXACT_FP_BEGIN _Pragma("STDC FP_CONTRACT OFF")
#define SOT_EXACT_FP_END _Pragma("STDC FP_CONTRACT DEFAULT")
#elif defined(__GNUC__)
#define SOT_EXACT_FP_BEGIN _Pragma("GCC push_options") _Pragma("GCC optimize(\"fp-contract=off\")")
#define SOT_EXACT_FP_END _Pragma("GCC pop_options")
#else
#define SOT_EXACT_FP_BEGIN
#define SOT_EXACT_FP_END
#endif

#endif
