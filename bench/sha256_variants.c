
/*
 * The ways to take one SHA-256 of a 24-byte key with libcrypto, for
 * callgrind (bench/README.md, "Request path"):
 *
 *   cc -O2 -o /tmp/sha256_variants bench/sha256_variants.c -lcrypto
 *   valgrind --tool=callgrind --callgrind-out-file=/tmp/sha.out \
 *       /tmp/sha256_variants
 *   callgrind_annotate --inclusive=yes /tmp/sha.out | grep ' h_'
 *
 * Each h_* runs N + 1 times; inclusive Ir / (N + 1) is its cost a key.
 */

#define OPENSSL_SUPPRESS_DEPRECATED

#include <stdio.h>
#include <stdint.h>
#include <string.h>

#include <openssl/evp.h>
#include <openssl/sha.h>


#define N  10000


typedef void (*hash_pt)(const void *k, size_t len, unsigned char *out);


/* what meter_key_hash() did before issue 12 */
__attribute__((noinline)) static void
h_evp_init_ex2(const void *k, size_t len, unsigned char *out)
{
    unsigned int         n;
    static EVP_MD       *md;
    static EVP_MD_CTX   *ctx;

    if (ctx == NULL) {
        md = EVP_MD_fetch(NULL, "SHA256", NULL);
        ctx = EVP_MD_CTX_new();
    }

    EVP_DigestInit_ex2(ctx, md, NULL);
    EVP_DigestUpdate(ctx, k, len);
    EVP_DigestFinal_ex(ctx, out, &n);
}


__attribute__((noinline)) static void
h_evp_init_ex(const void *k, size_t len, unsigned char *out)
{
    unsigned int         n;
    static EVP_MD       *md;
    static EVP_MD_CTX   *ctx;

    if (ctx == NULL) {
        md = EVP_MD_fetch(NULL, "SHA256", NULL);
        ctx = EVP_MD_CTX_new();
    }

    EVP_DigestInit_ex(ctx, md, NULL);
    EVP_DigestUpdate(ctx, k, len);
    EVP_DigestFinal_ex(ctx, out, &n);
}


__attribute__((noinline)) static void
h_low_level(const void *k, size_t len, unsigned char *out)
{
    SHA256_CTX  c;

    SHA256_Init(&c);
    SHA256_Update(&c, k, len);
    SHA256_Final(out, &c);
}


__attribute__((noinline)) static void
h_sha256(const void *k, size_t len, unsigned char *out)
{
    SHA256(k, len, out);
}


__attribute__((noinline)) static void
h_q_digest(const void *k, size_t len, unsigned char *out)
{
    size_t  n;

    EVP_Q_digest(NULL, "SHA256", NULL, k, len, out, &n);
}


int
main(void)
{
    int            f, i;
    size_t         len;
    const char    *key = "mk_cost_0001234_4f9c2a7e";
    unsigned char  out[32], want[32];
    hash_pt        fs[] = { h_evp_init_ex2, h_evp_init_ex, h_low_level,
                            h_sha256, h_q_digest };

    len = strlen(key);
    h_low_level(key, len, want);

    for (f = 0; f < (int) (sizeof(fs) / sizeof(fs[0])); f++) {
        for (i = 0; i < N + 1; i++) {
            fs[f](key, len, out);
        }

        if (memcmp(out, want, sizeof(out)) != 0) {
            printf("variant %d: wrong digest\n", f);
            return 1;
        }
    }

    return 0;
}
