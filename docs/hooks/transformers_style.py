"""MkDocs hook: transformers' docstring conventions, rendered as transformers' own documentation renders them.

Its argument types are prose with markup (``(`torch.LongTensor` of shape `(batch, length)`, *optional*)``), which the
reference's Type column would show with the backticks and asterisks, and its cross-references are written
``[`VGRProcessor`]``, whose brackets would stay in the text.
"""

import re


MARKED_UP_TYPE = re.compile(r"<code>([^<]*`[^<]*)</code>")
BRACKETED_NAME = re.compile(r"\[(<code>[\w.]+</code>)\]")


def on_page_content(html, page, config, files):
    html = MARKED_UP_TYPE.sub(lambda match: "<code>" + match.group(1).replace("`", "").replace("*", "") + "</code>",
                              html)
    return BRACKETED_NAME.sub(r"\1", html)
