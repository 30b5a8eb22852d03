// Throughput of the 512-bit operations the CPU kernels are made of, alone and in pairs, in operations a cycle: which
// operations share a pipe on this core (the port model behind benchmarks/README.md's compute roofs).
//
//   gcc -O2 -mavx512f -mavx512bw benchmarks/vector_pipes.c -o /tmp/vector_pipes && /tmp/vector_pipes
//
// Each line runs 12 independent register chains (no loads, no dependency between iterations beyond each chain's own
// register), so the time is the issue rate, not a latency. Cycles come from a dependent chain of scalar adds (one a
// cycle on any x86 core), measured in the same run, since a VM's TSC does not count core cycles. Needs AVX-512BW.
#include <stdio.h>
#include <time.h>

static double now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec + t.tv_nsec * 1e-9;
}

#define N 20000000L
#define CLOBBER                                                                                                       \
  "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8", "xmm9", "xmm10", "xmm11", "xmm12", "xmm13", \
      "xmm14", "xmm15", "xmm16", "xmm17", "xmm18", "xmm19", "xmm20", "xmm21", "xmm22", "xmm23", "xmm24", "xmm25",     \
      "xmm26", "xmm27", "k1", "k2"
#define TIMED(name, code)                                                        \
  static double name(void) {                                                     \
    double t0 = now();                                                           \
    for (long i = 0; i < N; i++) __asm__ volatile(code ::: CLOBBER);            \
    return (now() - t0) / N;                                                     \
  }
#define S(x) #x
// one operation on chain register i (zmm15 and zmm14 are constant sources)
#define FMA(i) "vfmadd231ps %%zmm15, %%zmm14, %%zmm" S(i) "\n"
#define ADD(i) "vaddps %%zmm15, %%zmm" S(i) ", %%zmm" S(i) "\n"
#define SUB(i) "vsubps %%zmm15, %%zmm14, %%zmm" S(i) "\n"
#define MAX(i) "vmaxps %%zmm15, %%zmm" S(i) ", %%zmm" S(i) "\n"
#define PADD(i) "vpaddd %%zmm15, %%zmm" S(i) ", %%zmm" S(i) "\n"
#define PAND(i) "vpandd %%zmm15, %%zmm" S(i) ", %%zmm" S(i) "\n"
#define PMAX(i) "vpmaxsw %%zmm15, %%zmm" S(i) ", %%zmm" S(i) "\n"
#define SLLD(i) "vpslld $16, %%zmm15, %%zmm" S(i) "\n"
#define CMPPS(i) "vcmpleps %%zmm15, %%zmm" S(i) ", %%k2\n"
#define PCMP(i) "vpcmpgtw %%zmm15, %%zmm" S(i) ", %%k2\n"
#define MPADD(i) "vpaddd %%zmm15, %%zmm" S(i) ", %%zmm" S(i) "%{%%k1%}\n"
#define MADD(i) "vaddps %%zmm15, %%zmm" S(i) ", %%zmm" S(i) "%{%%k1%}\n"
#define X12(op) op(0) op(1) op(2) op(3) op(4) op(5) op(6) op(7) op(8) op(9) op(10) op(11)
// pairs: op a on zmm0-5, op b on zmm16-21 (independent chains)
#define X6(a, b) a(0) b(16) a(1) b(17) a(2) b(18) a(3) b(19) a(4) b(20) a(5) b(21)

TIMED(t_fma, X12(FMA)) TIMED(t_add, X12(ADD)) TIMED(t_sub, X12(SUB)) TIMED(t_max, X12(MAX)) TIMED(t_padd, X12(PADD))
TIMED(t_pand, X12(PAND)) TIMED(t_pmax, X12(PMAX)) TIMED(t_slld, X12(SLLD)) TIMED(t_cmpps, X12(CMPPS))
TIMED(t_pcmp, X12(PCMP)) TIMED(t_mpadd, X12(MPADD)) TIMED(t_madd, X12(MADD))
TIMED(t_fma_add, X6(FMA, ADD)) TIMED(t_add_max, X6(ADD, MAX)) TIMED(t_add_slld, X6(ADD, SLLD))
TIMED(t_fma_cmpps, X6(FMA, CMPPS)) TIMED(t_fma_pcmp, X6(FMA, PCMP)) TIMED(t_fma_padd, X6(FMA, PADD))
TIMED(t_add_padd, X6(ADD, PADD)) TIMED(t_add_cmpps, X6(ADD, CMPPS)) TIMED(t_padd_pcmp, X6(PADD, PCMP))

static double t_cycle(void) {  // 8 dependent adds an iteration
  double t0 = now();
  for (long i = 0; i < N; i++)
    __asm__ volatile("add %%rax,%%rbx\n add %%rbx,%%rax\n add %%rax,%%rbx\n add %%rbx,%%rax\n"
                     "add %%rax,%%rbx\n add %%rbx,%%rax\n add %%rax,%%rbx\n add %%rbx,%%rax\n" ::: "rax", "rbx");
  return (now() - t0) / N / 8;
}

int main(void) {
  const struct {
    const char* name;
    double (*fn)(void);
  } cases[] = {
      {"vfmadd231ps", t_fma},         {"vaddps", t_add},
      {"vsubps", t_sub},              {"vmaxps", t_max},
      {"vpaddd", t_padd},             {"vpandd", t_pand},
      {"vpmaxsw", t_pmax},            {"vpslld", t_slld},
      {"vcmpleps -> k", t_cmpps},     {"vpcmpgtw -> k", t_pcmp},
      {"vpaddd {k}", t_mpadd},        {"vaddps {k}", t_madd},
      {"vfmadd + vaddps", t_fma_add}, {"vaddps + vmaxps", t_add_max},
      {"vaddps + vpslld", t_add_slld}, {"vfmadd + vcmpleps", t_fma_cmpps},
      {"vfmadd + vpcmpgtw", t_fma_pcmp}, {"vfmadd + vpaddd", t_fma_padd},
      {"vaddps + vpaddd", t_add_padd}, {"vaddps + vcmpleps", t_add_cmpps},
      {"vpaddd + vpcmpgtw", t_padd_pcmp},
  };
  const double cycle = t_cycle();
  printf("core clock by a dependent add chain: %.2f GHz\n", 1e-9 / cycle);
  printf("512-bit operations a cycle (12 independent chains; a pair: 6 + 6):\n");
  for (unsigned i = 0; i < sizeof cases / sizeof cases[0]; ++i)
    printf("  %-20s %.2f\n", cases[i].name, 12.0 / (cases[i].fn() / cycle));
  return 0;
}
