
/*
 * Copyright (C) nginx-meter authors
 *
 * provider_util.c: meter_list_walk(), the list walker of the Stripe,
 * Recurly and Chargebee lists, in its three cursor styles; pages are
 * served by the test's own get callback (no HTTP).
 */


#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <setjmp.h>
#include <cmocka.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <curl/curl.h>

#include "provider_util.h"


typedef struct {
    const char                 *pages[4];
    int                         npages;
    char                        urls[4][512];
    int                         nget;
    char                        items[256];
    const char                 *stop_at;    /* item id that stops it */
} walk_t;


static meter_send_e
get(void *ctx, const char *url, cJSON **json, meter_send_result_t *res)
{
    walk_t  *w;

    w = ctx;

    (void) res;

    assert_true(w->nget < w->npages);
    snprintf(w->urls[w->nget], sizeof(w->urls[0]), "%s", url);
    *json = cJSON_Parse(w->pages[w->nget++]);
    assert_non_null(*json);

    return METER_SEND_OK;
}


static int
item(void *ctx, const cJSON *o, meter_send_result_t *res)
{
    walk_t      *w;
    const char  *id;

    w = ctx;

    (void) res;

    id = meter_json_str(o, "id", (char *) NULL);
    if (id == NULL) {
        id = meter_json_str(o, "usage", "id", (char *) NULL);
    }

    assert_non_null(id);
    snprintf(w->items + strlen(w->items), sizeof(w->items) - strlen(w->items),
             "%s,", id);

    return (w->stop_at != NULL && strcmp(id, w->stop_at) == 0) ? 7 : 0;
}


static void
setup_list(meter_list_t *l, meter_list_e style, walk_t *w, CURL *curl)
{
    memset(l, 0, sizeof(*l));
    l->style = style;
    l->what = "test list";
    l->base = "https://api.test/v3";
    l->curl = curl;
    l->max_pages = 3;
    l->get = get;
    l->item = item;
    l->ctx = w;
}


static void
test_after(void **state)
{
    CURL                 *curl;
    walk_t                w;
    meter_list_t          l;
    meter_send_result_t   res;

    (void) state;

    curl = curl_easy_init();
    memset(&w, 0, sizeof(w));
    memset(&res, 0, sizeof(res));
    w.pages[0] = "{\"data\":[{\"id\":\"a\"},{\"id\":\"b b\"}],\"has_more\":true}";
    w.pages[1] = "{\"data\":[{\"id\":\"c\"}],\"has_more\":false}";
    w.npages = 2;

    setup_list(&l, METER_LIST_AFTER, &w, curl);
    assert_int_equal(meter_list_walk(&l, "https://s.test/v1/x?limit=100",
                                     &res), 0);
    assert_int_equal(w.nget, 2);
    assert_string_equal(w.urls[0], "https://s.test/v1/x?limit=100");
    assert_string_equal(w.urls[1],
                        "https://s.test/v1/x?limit=100&starting_after=b%20b");
    assert_string_equal(w.items, "a,b b,c,");

    /* has_more without a last id */
    memset(&w, 0, sizeof(w));
    w.pages[0] = "{\"data\":[],\"has_more\":true}";
    w.npages = 1;
    assert_int_equal(meter_list_walk(&l, "https://s.test/v1/x?a=1", &res),
                     -1);
    assert_int_equal(res.status, METER_SEND_RETRY);
    assert_non_null(strstr(res.error, "has_more without a last id"));

    curl_easy_cleanup(curl);
}


static void
test_next(void **state)
{
    CURL                 *curl;
    walk_t                w;
    meter_list_t          l;
    meter_send_result_t   res;

    (void) state;

    curl = curl_easy_init();
    memset(&w, 0, sizeof(w));
    memset(&res, 0, sizeof(res));
    /* a path (api.yaml), then a full URL on the base */
    w.pages[0] = "{\"data\":[{\"id\":\"a\"}],\"has_more\":true,"
                 "\"next\":\"/subs/x/usage?cursor=2&limit=1\"}";
    w.pages[1] = "{\"data\":[{\"id\":\"b\"}],\"has_more\":true,"
                 "\"next\":\"https://api.test/v3/subs/x/usage?cursor=3\"}";
    w.pages[2] = "{\"data\":[{\"id\":\"c\"}],\"has_more\":false,"
                 "\"next\":null}";
    w.npages = 3;

    setup_list(&l, METER_LIST_NEXT, &w, curl);
    assert_int_equal(meter_list_walk(&l, "https://api.test/v3/subs/x/usage"
                                     "?limit=1", &res), 0);
    assert_string_equal(w.urls[1],
                        "https://api.test/subs/x/usage?cursor=2&limit=1");
    assert_string_equal(w.urls[2],
                        "https://api.test/v3/subs/x/usage?cursor=3");
    assert_string_equal(w.items, "a,b,c,");

    /* elsewhere: not followed, the key goes nowhere else */
    memset(&w, 0, sizeof(w));
    w.pages[0] = "{\"data\":[],\"has_more\":true,"
                 "\"next\":\"https://evil.test/v3/steal\"}";
    w.pages[1] = "{\"data\":[]}";
    w.npages = 2;
    assert_int_equal(meter_list_walk(&l, "https://api.test/v3/a?b=1", &res),
                     -1);
    assert_int_equal(w.nget, 1);
    assert_int_equal(res.status, METER_SEND_FATAL);

    /* has_more without next */
    memset(&w, 0, sizeof(w));
    w.pages[0] = "{\"data\":[],\"has_more\":true}";
    w.npages = 1;
    assert_int_equal(meter_list_walk(&l, "https://api.test/v3/a?b=1", &res),
                     -1);
    assert_non_null(strstr(res.error, "no next"));

    curl_easy_cleanup(curl);
}


static void
test_offset(void **state)
{
    CURL                 *curl;
    walk_t                w;
    meter_list_t          l;
    meter_send_result_t   res;

    (void) state;

    curl = curl_easy_init();
    memset(&w, 0, sizeof(w));
    memset(&res, 0, sizeof(res));
    w.pages[0] = "{\"list\":[{\"usage\":{\"id\":\"u1\"}}],"
                 "\"next_offset\":\"[\\\"17\\\",\\\"9\\\"]\"}";
    w.pages[1] = "{\"list\":[{\"usage\":{\"id\":\"u2\"}}]}";
    w.npages = 2;

    setup_list(&l, METER_LIST_OFFSET, &w, curl);
    assert_int_equal(meter_list_walk(&l, "https://c.test/api/v2/usages?"
                                     "limit=100", &res), 0);
    assert_string_equal(w.urls[1], "https://c.test/api/v2/usages?limit=100"
                        "&offset=%5B%2217%22%2C%229%22%5D");
    assert_string_equal(w.items, "u1,u2,");

    /* "data" is not Chargebee's */
    memset(&w, 0, sizeof(w));
    w.pages[0] = "{\"data\":[]}";
    w.npages = 1;
    assert_int_equal(meter_list_walk(&l, "https://c.test/x?a=1", &res), -1);
    assert_int_equal(res.status, METER_SEND_RETRY);
    assert_non_null(strstr(res.error, "without \"list\""));

    curl_easy_cleanup(curl);
}


static void
test_stop_and_page_limit(void **state)
{
    CURL                 *curl;
    walk_t                w;
    meter_list_t          l;
    meter_send_result_t   res;

    (void) state;

    curl = curl_easy_init();
    memset(&w, 0, sizeof(w));
    memset(&res, 0, sizeof(res));
    w.pages[0] = "{\"data\":[{\"id\":\"a\"},{\"id\":\"b\"},{\"id\":\"c\"}],"
                 "\"has_more\":true}";
    w.npages = 1;
    w.stop_at = "b";

    /* an item's stop ends the walk with its value, no further page */
    setup_list(&l, METER_LIST_AFTER, &w, curl);
    assert_int_equal(meter_list_walk(&l, "https://s.test/x?a=1", &res), 7);
    assert_string_equal(w.items, "a,b,");
    assert_int_equal(w.nget, 1);

    /* an endless list stops at max_pages */
    memset(&w, 0, sizeof(w));
    w.pages[0] = "{\"data\":[{\"id\":\"a\"}],\"has_more\":true}";
    w.pages[1] = "{\"data\":[{\"id\":\"b\"}],\"has_more\":true}";
    w.pages[2] = "{\"data\":[{\"id\":\"c\"}],\"has_more\":true}";
    w.npages = 3;
    assert_int_equal(meter_list_walk(&l, "https://s.test/x?a=1", &res), -1);
    assert_int_equal(w.nget, 3);
    assert_non_null(strstr(res.error, "more than 3 pages"));

    curl_easy_cleanup(curl);
}


int
main(void)
{
    const struct CMUnitTest  tests[] = {
        cmocka_unit_test(test_after),
        cmocka_unit_test(test_next),
        cmocka_unit_test(test_offset),
        cmocka_unit_test(test_stop_and_page_limit),
    };

    return cmocka_run_group_tests(tests, NULL, NULL);
}
