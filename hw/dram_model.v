// Simulation-only external memory for the kvoverlay overlay (not synthesizable as a board memory).
//
// One burst port of WORD_BITS (config.port_bits): a request (word address, beats, read/write) is accepted while
// idle; a read then returns `len` beats, one per cycle, READ_LATENCY cycles after acceptance; a write accepts `len`
// beats with byte strobes, one per cycle (wr_ready is high for the whole burst). A second, read-only port
// returns one 128-bit instruction per cycle (latency 1) for the front end's fetch.
//
// The image is loaded with $readmemh from the file named by the plusarg +DRAM_IMAGE=path (one word per line,
// `@addr` lines allowed); on a rising `dump` the words [0, dump_words) are written with $writememh to +DRAM_DUMP=path.
// A third port, combinational and read-only, lets the host read single words between runs (a decode session reads
// each step's logits record through it without dumping the memory).
module kvo_dram_model #(
    parameter WORD_BITS = 64,
    parameter ADDR_BITS = 21,
    parameter LEN_BITS = 22,
    parameter INSN_ADDR_BITS = 20,
    parameter READ_LATENCY = 2
) (
    input  wire                      clk,
    input  wire                      rst,
    input  wire                      req_valid,
    output wire                      req_ready,
    input  wire                      req_write,
    input  wire [ADDR_BITS-1:0]      req_addr,
    input  wire [LEN_BITS-1:0]       req_len,
    output reg                       rd_valid,
    output reg  [WORD_BITS-1:0]      rd_data,
    input  wire                      wr_valid,
    output wire                      wr_ready,
    input  wire [WORD_BITS-1:0]      wr_data,
    input  wire [WORD_BITS/8-1:0]    wr_strb,
    input  wire [INSN_ADDR_BITS-1:0] insn_addr,
    output reg  [127:0]              insn_data,
    input  wire                      dump,
    input  wire [ADDR_BITS:0]        dump_words,
    input  wire [ADDR_BITS-1:0]      host_rd_addr,
    output wire [WORD_BITS-1:0]      host_rd_data
);
    localparam WORD_BYTES = WORD_BITS / 8;
    reg [WORD_BITS-1:0] mem [0:(1 << ADDR_BITS) - 1];

    reg burst_busy, burst_write;
    reg [ADDR_BITS-1:0] burst_addr;
    reg [LEN_BITS-1:0] burst_left;
    reg [7:0] burst_wait;
    reg dump_seen;
    string image_path, dump_path;
    integer i;

    initial begin
        for (i = 0; i < (1 << ADDR_BITS); i = i + 1) mem[i] = {WORD_BITS{1'b0}};
        if ($value$plusargs("DRAM_IMAGE=%s", image_path)) $readmemh(image_path, mem);
    end

    assign req_ready = !burst_busy;
    assign host_rd_data = mem[host_rd_addr];
    assign wr_ready = burst_busy && burst_write;

    always @(posedge clk) begin
        rd_valid <= 1'b0;
        if (rst) begin
            burst_busy <= 1'b0;
        end else if (!burst_busy) begin
            if (req_valid) begin
                burst_busy <= 1'b1;
                burst_write <= req_write;
                burst_addr <= req_addr;
                burst_left <= req_len;
                burst_wait <= READ_LATENCY;
            end
        end else if (!burst_write) begin
            if (burst_wait != 0) begin
                burst_wait <= burst_wait - 1;
            end else begin
                rd_valid <= 1'b1;
                rd_data <= mem[burst_addr];
                burst_addr <= burst_addr + 1;
                burst_left <= burst_left - 1;
                if (burst_left == 1) burst_busy <= 1'b0;
            end
        end else if (wr_valid) begin
            for (i = 0; i < WORD_BYTES; i = i + 1)
                if (wr_strb[i]) mem[burst_addr][8*i +: 8] <= wr_data[8*i +: 8];
            burst_addr <= burst_addr + 1;
            burst_left <= burst_left - 1;
            if (burst_left == 1) burst_busy <= 1'b0;
        end
    end

    // Instruction fetch: 128 bits at instruction index insn_addr, assembled from (or sliced out of) memory words.
    generate
        if (WORD_BITS >= 128) begin : insn_wide
            localparam PER_WORD = WORD_BITS / 128;
            always @(posedge clk)
                insn_data <= mem[insn_addr / PER_WORD][128 * (insn_addr % PER_WORD) +: 128];
        end else begin : insn_narrow
            localparam WORDS = 128 / WORD_BITS;
            integer k;
            always @(posedge clk)
                for (k = 0; k < WORDS; k = k + 1)
                    insn_data[WORD_BITS * k +: WORD_BITS] <= mem[insn_addr * WORDS + k];
        end
    endgenerate

    always @(posedge clk) begin
        dump_seen <= dump;
        if (dump && !dump_seen && $value$plusargs("DRAM_DUMP=%s", dump_path))
            $writememh(dump_path, mem, 0, dump_words - 1);
    end
endmodule
