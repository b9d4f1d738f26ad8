// moe-greedy-ids: greedy generation with llama.cpp from a prompt given as token ids, printing the
// generated token ids as JSON. Built by benches/llama-cpp/build.sh against the cached llama.cpp
// (based on its examples/simple/simple.cpp; that example takes text and prints text).
//
//   moe-greedy-ids -m model.gguf --ids 1,298,389,390 -n 128 [-t 2] [--kv f32|f16]
//   -> {"prompt_ids":[...],"generated_ids":[...]}
// Generation does not stop at end-of-generation tokens (like moe-run --ignore-eos).
#include "llama.h"
#include "ggml.h"
#include <clocale>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <sstream>
#include <string>
#include <vector>

static void batch_set_tokens(llama_batch_ext * batch, const llama_token * tokens, int32_t n_tokens, llama_pos pos_0) {
    llama_batch_ext_clear(batch);
    for (int32_t i = 0; i < n_tokens; ++i) {
        const int32_t idx = llama_batch_ext_add_token(batch, 0, tokens[i]);
        const llama_pos pos = pos_0 + i;
        llama_batch_ext_set_pos(batch, idx, &pos);
    }
    llama_batch_ext_set_output_logits(batch, n_tokens - 1, true);
}

static void usage(const char * argv0) {
    fprintf(stderr, "usage: %s -m model.gguf --ids 1,2,3 [-n N] [-t threads] [--kv f32|f16]\n", argv0);
    exit(2);
}

static void quiet_log(ggml_log_level level, const char * text, void *) {
    if (level >= GGML_LOG_LEVEL_WARN) fputs(text, stderr);
}

int main(int argc, char ** argv) {
    std::setlocale(LC_NUMERIC, "C");
    std::string model_path, ids_arg, kv = "f32";
    int n_predict = 32, n_threads = 2;
    for (int i = 1; i < argc; i++) {
        std::string a = argv[i];
        auto next = [&]() -> const char * { if (i + 1 >= argc) usage(argv[0]); return argv[++i]; };
        if (a == "-m") model_path = next();
        else if (a == "--ids") ids_arg = next();
        else if (a == "-n") n_predict = atoi(next());
        else if (a == "-t") n_threads = atoi(next());
        else if (a == "--kv") kv = next();
        else usage(argv[0]);
    }
    if (model_path.empty() || ids_arg.empty() || n_predict < 1) usage(argv[0]);
    std::vector<llama_token> prompt;
    {
        std::stringstream ss(ids_arg);
        std::string tok;
        while (std::getline(ss, tok, ',')) if (!tok.empty()) prompt.push_back((llama_token) atoi(tok.c_str()));
    }
    if (prompt.empty()) usage(argv[0]);
    const int n_prompt = (int) prompt.size();

    llama_log_set(quiet_log, nullptr);
    llama_backend_init();
    llama_model_params mp = llama_model_default_params();
    mp.n_gpu_layers = 0;
    llama_model * model = llama_model_load_from_file(model_path.c_str(), mp);
    if (!model) { fprintf(stderr, "error: unable to load %s\n", model_path.c_str()); return 1; }

    llama_context_params cp = llama_context_default_params();
    cp.n_ctx = n_prompt + n_predict;
    cp.n_batch = n_prompt;
    cp.n_ubatch = n_prompt;
    cp.n_threads = n_threads;
    cp.n_threads_batch = n_threads;
    if (kv == "f32") { cp.type_k = GGML_TYPE_F32; cp.type_v = GGML_TYPE_F32; }
    else if (kv == "f16") { cp.type_k = GGML_TYPE_F16; cp.type_v = GGML_TYPE_F16; }
    else usage(argv[0]);
    llama_context * ctx = llama_init_from_model(model, cp);
    if (!ctx) { fprintf(stderr, "error: failed to create the context\n"); return 1; }

    llama_sampler * smpl = llama_sampler_chain_init(llama_sampler_chain_default_params());
    llama_sampler_chain_add(smpl, llama_sampler_init_greedy());

    llama_batch_ext * batch = llama_batch_ext_init(ctx);
    batch_set_tokens(batch, prompt.data(), n_prompt, 0);
    std::vector<llama_token> out;
    int n_pos = 0, n_tokens = n_prompt;
    while ((int) out.size() < n_predict) {
        if (llama_process(ctx, LLAMA_PROCESS_TYPE_DECODE, batch)) {
            fprintf(stderr, "error: decode failed\n");
            return 1;
        }
        n_pos += n_tokens;
        llama_token t = llama_sampler_sample(smpl, ctx, -1);
        out.push_back(t);
        batch_set_tokens(batch, &t, 1, n_pos);
        n_tokens = 1;
    }
    printf("{\"prompt_ids\":[");
    for (int i = 0; i < n_prompt; i++) printf(i ? ",%d" : "%d", prompt[i]);
    printf("],\"generated_ids\":[");
    for (size_t i = 0; i < out.size(); i++) printf(i ? ",%d" : "%d", out[i]);
    printf("]}\n");

    llama_batch_ext_free(batch);
    llama_sampler_free(smpl);
    llama_free(ctx);
    llama_model_free(model);
    return 0;
}
