// Self-contained Verilator harness of the overlay's run path (kvoverlay.sim.rtl_harness builds it, RtlProcess
// drives it). The clock is a C++ loop around eval(), within a run around the clock edge's phases of it alone: no
// VPI, no coroutine scheduler and no public signals but the memory array, so Verilator optimises the whole design.
// Built with --trace, +WAVES=path writes a VCD.
//
// One command per line on stdin, one reply per line on stdout (numbers in decimal, memory and buffer words in hex):
//   init PROG_BASE WATCHDOG N_COUNTERS    -> ok
//   reg I V [I V ...]                     -> ok            host register writes, one per cycle
//   run PROG_BASE MAX_CYCLES              -> RUNS TIMEOUT ERROR CODE INFO PC WALL_S CPU_S C0 C1 ...
//   regs N / eregs N                      -> N values      scalar (unsigned) / exponent registers
//   rd FIRST COUNT                        -> COUNT words   external memory, port words
//   wr FIRST WORD [WORD ...]              -> ok            external memory, between runs
//   abuf N / acc N                        -> N words       activation buffer / accumulators (debug ports)
//   reset                                 -> ok            pulse rst (the next run starts a new sequence)
//   quit                                  -> bye
// The memory image comes in through the memory model's $readmemh (+DRAM_IMAGE=path).
#include <cstdint>
#include <cstdio>
#include <ctime>
#include <iostream>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

#include "verilated.h"
#include "kvo_mem.h"
#if VM_TRACE
#include "verilated_vcd_c.h"
#endif  // generated: KVO_MEM(top), the memory model's word array

// Units in clock domains of their own (hw.overlay.Overlay's gated_units; kvo_mem.h defines these for them):
// KVO_GATE_CLK sets every unit clock, KVO_GATE_EDGE sets each to its gate_<unit> output (an idle unit sees no edge,
// and Verilator skips its sequential logic), KVO_GATE_RST follows the reset, KVO_GATE_PREV0 marks the unit clocks
// seen low as KVO_CLK_PREV does the main one.
#ifndef KVO_GATE_CLK
#define KVO_GATE_CLK(top, v) do { } while (0)
#define KVO_GATE_EDGE(top) do { } while (0)
#define KVO_GATE_RST(top, v) do { } while (0)
#define KVO_GATE_PREV0(top) do { } while (0)
#endif

namespace {

std::string hexword(uint64_t v) {
    char b[20];
    std::snprintf(b, sizeof b, "%llx", static_cast<unsigned long long>(v));
    return b;
}

template <std::size_t N>
std::string hexword(const VlWide<N>& w) {
    std::string s;
    char b[12];
    for (int i = static_cast<int>(N) - 1; i >= 0; --i) {
        std::snprintf(b, sizeof b, s.empty() ? "%x" : "%08x", w[i]);
        if (!s.empty() || w[i] || i == 0) s += b;
    }
    return s;
}

void sethex(uint64_t& dst, const std::string& h) { dst = std::stoull(h, nullptr, 16); }
void sethex(uint32_t& dst, const std::string& h) { dst = static_cast<uint32_t>(std::stoull(h, nullptr, 16)); }

template <std::size_t N>
void sethex(VlWide<N>& dst, const std::string& h) {
    for (std::size_t i = 0; i < N; ++i) {
        long end = static_cast<long>(h.size()) - 8 * static_cast<long>(i);
        long begin = end - 8 < 0 ? 0 : end - 8;
        dst[i] = end > 0 ? static_cast<uint32_t>(std::stoul(h.substr(begin, end - begin), nullptr, 16)) : 0;
    }
}

double cpu_now() {
    timespec ts;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
    return ts.tv_sec + 1e-9 * ts.tv_nsec;
}

double wall_now() {
    timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + 1e-9 * ts.tv_nsec;
}

}  // namespace

int main(int argc, char** argv) {
    auto ctx = std::make_unique<VerilatedContext>();
    ctx->commandArgs(argc, argv);
    auto top = std::make_unique<KVO_TOP>(ctx.get());
    auto& mem = KVO_MEM(top);
#if VM_TRACE
    // waveforms (+WAVES=path): every edge evaluated and dumped
    std::unique_ptr<VerilatedVcdC> vcd;
    uint64_t vcd_time = 0;
    const char* waves = ctx->commandArgsPlusMatch("WAVES=");
    if (waves && *waves) {
        ctx->traceEverOn(true);
        vcd = std::make_unique<VerilatedVcdC>();
        top->trace(vcd.get(), 99);
        vcd->open(waves + std::string("+WAVES=").size());
    }
#endif
    auto tick = [&] {
        top->clk = 1;
        KVO_GATE_CLK(top, 1);
        top->eval();
#if VM_TRACE
        if (vcd) {
            vcd->dump(vcd_time += 5000);  // ps: the 10 ns clock of the cocotb wrapper (hw/sim_overlay.py)
            top->clk = 0;
            KVO_GATE_CLK(top, 0);
            top->eval();
            vcd->dump(vcd_time += 5000);
            return;
        }
#endif
        top->clk = 0;
        KVO_GATE_CLK(top, 0);
#ifdef KVO_CLK_PREV
        // The design has no negative-edge logic: rather than a second eval() (which settles every input-driven
        // path again, ~30% of the run time), tell the model it has seen the clock low.
        KVO_CLK_PREV(top) = 0;
        KVO_GATE_PREV0(top);
#else
        top->eval();
#endif
    };
    // One clock cycle with the inputs as the last eval() left them: the clock edge alone. eval() first settles the
    // logic that reads the top-level inputs (Verilator's 'ico' region, ~15% of a cycle) whether or not they
    // changed; within a run nothing but the clock changes, and that logic is also evaluated after each edge where it
    // reads state, so only the edge's phases need to run (KVO_EDGE: not defined in a tracing build).
    auto edge = [&] {
#if defined(KVO_EDGE) && defined(KVO_CLK_PREV)
        top->clk = 1;
        KVO_GATE_EDGE(top);
        KVO_EDGE(top);
        top->clk = 0;
        KVO_GATE_CLK(top, 0);
        KVO_CLK_PREV(top) = 0;
        KVO_GATE_PREV0(top);
#else
        tick();
#endif
    };
    top->clk = 0;
    top->rst = 1;
    KVO_GATE_RST(top, 1);
    top->start = 0;
    top->host_reg_we = 0;
    top->eval();
    tick();
    tick();
    top->rst = 0;
    KVO_GATE_RST(top, 0);
    tick();
    unsigned n_counters = 0;
    long runs = 0;
    std::string line;
    std::ios::sync_with_stdio(false);
    std::cout << "ready " << mem.size() << std::endl;
    while (std::getline(std::cin, line)) {
        std::istringstream in(line);
        std::string op;
        in >> op;
        std::ostringstream out;
        if (op == "init") {
            uint64_t base, watchdog;
            in >> base >> watchdog >> n_counters;
            top->prog_base = base;
            top->watchdog_cycles = watchdog;
            out << "ok";
        } else if (op == "reg") {
            uint64_t i, v;
            while (in >> i >> v) {
                top->host_reg_we = 1;
                top->host_reg_addr = i;
                top->host_reg_data = static_cast<uint32_t>(v);
                tick();
            }
            top->host_reg_we = 0;
            tick();
            out << "ok";
        } else if (op == "run") {
            uint64_t base, max_cycles;
            in >> base >> max_cycles;
            top->prog_base = base;
            top->start = 1;
            tick();
            top->start = 0;
            double w0 = wall_now(), c0 = cpu_now();
            bool prev = top->done, timeout = true;
            for (uint64_t c = 0; c < max_cycles; ++c) {
                if (c == 0)
                    tick();  // start fell: settle the input logic once
                else
                    edge();
                if (top->done && !prev) {
                    timeout = false;
                    break;
                }
                prev = top->done;
            }
            double wall = wall_now() - w0, cpu = cpu_now() - c0;
            ++runs;
            out << runs << ' ' << timeout << ' ' << int(top->error) << ' ' << int(top->error_code) << ' '
                << int(top->error_info) << ' ' << top->error_pc << ' ' << wall << ' ' << cpu;
            tick();
            for (unsigned i = 0; i < n_counters; ++i) {
                top->ctr_addr = i;
                top->eval();
                out << ' ' << static_cast<uint64_t>(top->ctr_data);
            }
        } else if (op == "regs" || op == "eregs") {
            unsigned n;
            in >> n;
            out << "ok";
            for (unsigned i = 0; i < n; ++i) {
                if (op == "regs") {
                    top->dbg_reg_addr = i;
                    top->eval();
                    out << ' ' << static_cast<uint64_t>(top->dbg_reg_data);
                } else {
                    top->dbg_ereg_addr = i;
                    top->eval();
                    out << ' ' << static_cast<uint64_t>(top->dbg_ereg_data);
                }
            }
        } else if (op == "rd") {
            uint64_t first, count;
            in >> first >> count;
            out << "ok";
            for (uint64_t i = 0; i < count; ++i) out << ' ' << hexword(mem[first + i]);
        } else if (op == "wr") {
            uint64_t first;
            std::string h;
            in >> first;
            for (uint64_t i = first; in >> h; ++i) sethex(mem[i], h);
            out << "ok";
        } else if (op == "abuf" || op == "acc") {
            unsigned n;
            in >> n;
            out << "ok";
            for (unsigned i = 0; i < n; ++i) {
                if (op == "abuf") {
                    top->dbg_abuf_addr = i;
                    tick();
                    out << ' ' << hexword(top->dbg_abuf_data);
                } else {
                    top->dbg_acc_addr = i;
                    tick();
                    out << ' ' << hexword(top->dbg_acc_data);
                }
            }
        } else if (op == "reset") {
            top->rst = 1;
            KVO_GATE_RST(top, 1);
            tick();
            tick();
            top->rst = 0;
            KVO_GATE_RST(top, 0);
            tick();
            out << "ok";
        } else if (op == "quit") {
            std::cout << "bye" << std::endl;
            break;
        } else {
            out << "error unknown command " << op;
        }
        std::cout << out.str() << std::endl;
    }
    top->final();
#if VM_TRACE
    if (vcd) vcd->close();
#endif
    return 0;
}
