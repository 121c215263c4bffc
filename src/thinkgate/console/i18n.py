"""The console's interface text in English and Chinese (the seed page is Chinese).

The language is the `tg_lang` cookie's (set by the switch in the page header), else the first of zh/en in
Accept-Language, else Chinese. Text only: no secret or session state lives in that cookie."""

from __future__ import annotations

from fastapi import Request

LANGS = ("zh", "en")
COOKIE = "tg_lang"

# key: (English, Chinese)
TEXT: dict[str, tuple[str, str]] = {
    "models": ("Models", "模型"),
    "console": ("Console", "控制台"),
    "playground": ("Playground", "在线体验"),
    "admin": ("Admin", "管理"),
    "sign_in": ("Sign in", "登录"),
    "sign_up": ("Sign up", "注册"),
    "sign_out": ("Sign out", "退出"),
    "catalog_title": ("Models and prices", "模型与价格"),
    "catalog_lead": ("OpenAI-compatible API. Prices in CNY per 1000 tokens; reasoning tokens are output tokens.",
                     "兼容 OpenAI 接口规范。价格单位为人民币 / 每 1000 tokens,推理 tokens 按输出计费。"),
    "model_id": ("Model ID", "模型 ID"),
    "context_length": ("Context length", "上下文长度"),
    "capabilities": ("Capabilities", "模型能力"),
    "price_input": ("Price (input, per 1000 tokens)", "模型价格(每 1000 tokens 输入)"),
    "price_output": ("Price (output, per 1000 tokens)", "模型价格(每 1000 tokens 输出)"),
    "price_cached": ("Price (cached input, per 1000 tokens)", "模型价格(每 1000 tokens 缓存输入)"),
    "free": ("free", "免费"),
    "base_url": ("API base URL", "API 接口地址"),
    "endpoint": ("Endpoint", "请求地址"),
    "method": ("Method", "请求方法"),
    "compat_note": ("Compatible with OpenAI's API: set base_url to the address above and api_key to a key "
                    "from the console.", "此接口兼容 OpenAI 的接口规范:将 base_url 替换为上面的地址,api_key 替换为控制台中创建的 API Key。"),
    "samples": ("Code samples", "各编程语言代码示例"),
    "copy_text": ("Copy", "复制"),
    "copied": ("Copied", "已复制"),
    "parameters": ("Request parameters", "请求参数"),
    "param_name": ("Parameter", "参数"),
    "param_type": ("Type", "类型"),
    "param_range": ("Range", "取值范围"),
    "param_desc": ("Description", "说明"),
    "response_example": ("Response example", "响应示例"),
    "get_key": ("Get an API key", "获取 API Key"),
    "details": ("Details", "详情"),
    "cap_text": ("text generation", "文本生成"),
    "cap_reasoning": ("reasoning", "深度思考"),
    "cap_tools": ("tool calls", "工具调用"),
    "cap_json": ("structured outputs", "结构化输出"),
    "cap_vision": ("image input", "图片识别"),
    "email": ("Email", "邮箱"),
    "password": ("Password", "密码"),
    "admin_token": ("Admin token", "管理员令牌"),
    "admin_sign_in": ("Admin sign-in", "管理员登录"),
    "no_account": ("No account yet?", "还没有账号?"),
    "have_account": ("Already registered?", "已有账号?"),
    "no_gateway": ("This server runs without accounts.", "此服务器未启用账户。"),
    "admin_disabled": ("The admin view is disabled (start the server with --admin-token).",
                       "管理后台未启用(启动服务器时需设置 --admin-token)。"),
    "balance": ("Balance", "余额"),
    "spend": ("Spent", "已消费"),
    "requests": ("Requests", "请求数"),
    "redeem": ("Redeem a top-up code", "兑换充值码"),
    "redeem_btn": ("Redeem", "兑换"),
    "code": ("Code", "充值码"),
    "usage_chart": ("Spend per day and model (CNY)", "每日各模型消费(元)"),
    "recent": ("Recent requests", "最近请求"),
    "time": ("Time", "时间"),
    "model": ("Model", "模型"),
    "key": ("Key", "密钥"),
    "prompt_tokens": ("Prompt", "输入"),
    "completion_tokens": ("Completion", "输出"),
    "reasoning_tokens": ("Reasoning", "推理"),
    "cost": ("Cost (CNY)", "费用(元)"),
    "finish": ("Finish", "结束原因"),
    "latency": ("Latency (ms)", "耗时(毫秒)"),
    "keys_title": ("API keys", "API 密钥"),
    "new_key": ("Create a key", "创建密钥"),
    "key_name": ("Name", "名称"),
    "limit_cny": ("Spending limit (CNY, optional)", "消费上限(元,可选)"),
    "expires": ("Expires (date, optional)", "过期日期(可选)"),
    "rpm": ("Requests per minute (optional)", "每分钟请求数(可选)"),
    "create": ("Create", "创建"),
    "secret_once": ("Copy this key now: it is shown only once.", "请立即复制此密钥:它只显示这一次。"),
    "prefix": ("Prefix", "前缀"),
    "status": ("Status", "状态"),
    "created": ("Created", "创建时间"),
    "revoke": ("Revoke", "撤销"),
    "confirm_revoke": ("Revoke this key? Requests using it will fail.", "确定撤销此密钥?使用它的请求将会失败。"),
    "accounts": ("Accounts", "账户"),
    "name": ("Name", "名称"),
    "codes": ("Top-up codes", "充值码"),
    "amount": ("Amount (CNY)", "金额(元)"),
    "count": ("Count", "数量"),
    "new_codes": ("New codes (shown once):", "新充值码(仅显示一次):"),
    "usage_all": ("Usage across accounts", "全部账户用量"),
    "backends": ("Backend health", "后端状态"),
    "type": ("Type", "类型"),
    "state": ("State", "状态"),
    "active": ("Active requests", "进行中的请求"),
    "total": ("Total", "合计"),
    "messages": ("Messages", "消息"),
    "system": ("System prompt (optional)", "系统提示词(可选)"),
    "user_msg": ("Your message", "用户消息"),
    "max_tokens": ("Max tokens", "最大 tokens"),
    "temperature": ("Temperature", "温度"),
    "thinking_budget": ("Thinking budget (tokens, optional)", "思考预算(tokens,可选)"),
    "tools_json": ("Tools (JSON array, optional)", "工具(JSON 数组,可选)"),
    "tool_choice": ("Tool choice", "工具选择"),
    "seed": ("Seed (optional)", "随机种子(可选)"),
    "bill_key": ("Bill to key", "计费密钥"),
    "send": ("Send", "发送"),
    "new_chat": ("New chat", "新对话"),
    "role_user": ("You", "用户"),
    "role_assistant": ("Assistant", "助手"),
    "stop": ("Stop", "停止"),
    "reasoning": ("Reasoning", "思考过程"),
    "answer": ("Answer", "回答"),
    "tool_calls": ("Tool calls", "工具调用"),
    "usage": ("Usage", "用量"),
    "need_key": ("Create an API key in the console first: playground runs are billed to one of your keys.",
                 "请先在控制台创建 API 密钥:在线体验的费用计入您的某个密钥。"),
    "need_sign_in": ("Sign in to use the playground.", "请登录后使用在线体验。"),
    "no_data": ("No requests yet.", "暂无请求。"),
    "language": ("中文", "English"),  # the switch shows the other language
    "error": ("Error", "错误"),
    "no_model": ("This server has no model with that id.", "此服务器没有该模型。"),
    "admin_only_page": ("This page is for the admin: sign in with the admin token.",
                        "此页面仅供管理员使用:请用管理员令牌登录。"),
    # Errors the console's calls answer, by their `code` (others show the server's English message).
    "err_bad_credentials": ("Wrong email or password.", "邮箱或密码错误。"),
    "err_email_taken": ("This email is already registered: sign in instead.", "该邮箱已注册,请直接登录。"),
    "err_too_many_sign_ins": ("Too many attempts: try again later.", "尝试次数过多,请稍后再试。"),
    "err_bad_admin_token": ("Wrong admin token.", "管理员令牌错误。"),
    "err_invalid_password": ("The password must be 8 to 256 characters.", "密码长度须为 8 到 256 个字符。"),
    "err_invalid_code": ("This code is unknown or has already been redeemed.", "充值码无效或已被使用。"),
    "err_insufficient_balance": ("The balance is too low for this request.", "余额不足,无法完成此请求。"),
    "err_already_exists": ("That name is taken.", "该名称已被占用。"),
    "err_not_signed_in": ("Sign in first.", "请先登录。"),
    "err_bad_csrf_token": ("The page is out of date: reload it.", "页面已过期,请刷新。"),
}


def language(request: Request) -> str:
    chosen = request.cookies.get(COOKIE)
    if chosen in LANGS:
        return chosen
    for part in request.headers.get("accept-language", "").split(","):
        tag = part.split(";")[0].strip().lower()
        if tag.startswith("zh"):
            return "zh"
        if tag.startswith("en"):
            return "en"
    return "zh"


def texts(lang: str) -> dict[str, str]:
    i = 0 if lang == "en" else 1
    return {k: v[i] for k, v in TEXT.items()}


# Templates read `t.key`, which Jinja resolves as an attribute first: a key named like a dict method (keys,
# copy, items) would show the method instead of the text.
_CLASHES = set(TEXT) & set(dir(dict))
assert not _CLASHES, f"rename the console text keys {sorted(_CLASHES)}"
